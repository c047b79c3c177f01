"""The LoRA of a mixed-adapter batch, per layer in one pair of matrix products.

peft serves a batch whose rows use different adapters (`adapter_names`) by looping, in every LoRA
layer, over the adapters present: gather the rows, two small products, scale, scatter back. On this
CPU that is dispatch, not arithmetic: about ten small ops per adapter per layer, 30 ms per decode
step per distinct adapter on SmolLM2's 210 LoRA layers, against 93 ms for the whole base model
(a step over 5 adapters took twice the base step). Here each layer does the same work once,
whatever the number of adapters:

    h = x @ A_cat^T          A_cat: the present adapters' A matrices stacked   [R, in]
    h = h * mask             mask[row, col] = 1 where column col is the row's adapter's
    y = (h @ B_cat^T) * s    B_cat: their B matrices side by side [out, R]; s: the row's scaling
    output = base(x) + y

Rows of the base model (or of an adapter that leaves this layer alone) get a zero row mask and a
zero scale, so their output is the base layer's exactly. A batch of one adapter (every routing
decision, every request alone) runs peft's own expression, `B(A(x)) * scaling`, on the same
float32 tensors, so it gives peft's numbers bit for bit; a mixed batch sums the same products with
exact zeros beside them, equal to peft's up to the float rounding of the GEMM's blocking (5.7e-5 on
logits of about 20 here; the parity tests compare greedy tokens with plain peft).

No peft model at serving time: the base model stays as transformers built it, a forward hook on
each linear layer an adapter touches adds the LoRA for the rows of the forward pass in progress
(`GroupedLoRA.rows`), and an adapter is its tensors (`lora_weights.read_lora`, read off the engine
thread), so loading or removing one is a dictionary update between two steps.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from service.engine.errors import EngineFailureError
from service.engine.lora_weights import LayerWeights

BASE = "__base__"  # a row without an adapter (peft's own name for it in `adapter_names`)


@dataclass
class _Layer:
    """One linear layer that adapters touch: each one's A, B and scaling, and the stacked matrices
    of the last set of adapters a batch used (kept while batches keep that set: rebuilt only when
    a row of another adapter joins or the last row of one leaves)."""

    weights: dict[str, LayerWeights]
    stacked_for: tuple[str, ...] = ()
    stacked: tuple[torch.Tensor, torch.Tensor] | None = None
    layout: tuple[tuple[str, int, float], ...] = ()  # each stacked adapter's name, rank and scaling

    def stack(self, present: tuple[str, ...]
              ) -> tuple[torch.Tensor, torch.Tensor, tuple[tuple[str, int, float], ...]] | None:
        """The stacked A and B of the adapters in `present` that this layer carries, and their layout
        (None: none)."""
        here = tuple(n for n in present if n in self.weights)
        if not here:
            return None
        if self.stacked is None or self.stacked_for != here:
            self.stacked_for = here
            self.stacked = (torch.cat([self.weights[n][0] for n in here]),
                            torch.cat([self.weights[n][1] for n in here], dim=1))
            self.layout = tuple((n, self.weights[n][0].shape[0], self.weights[n][2]) for n in here)
        return self.stacked[0], self.stacked[1], self.layout


@dataclass
class _Plan:
    """The adapter of each row of one forward pass, and the masks it needs, built once per layout
    (which adapters a layer carries, with what ranks and scalings) and shared by the layers."""

    rows: tuple[str, ...]
    present: tuple[str, ...]
    uniform: str | None  # every row on this one adapter
    masks: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def mask(self, layout: tuple[tuple[str, int, float], ...], dtype: torch.dtype
             ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (layout, dtype)
        cached = self.masks.get(key)
        if cached is None:
            total = sum(width for _, width, _ in layout)
            mask = torch.zeros(len(self.rows), total, dtype=dtype)
            scale = torch.zeros(len(self.rows), 1, dtype=dtype)
            start = 0
            for name, width, scaling in layout:
                for i, row in enumerate(self.rows):
                    if row == name:
                        mask[i, start:start + width] = 1
                        scale[i, 0] = scaling
                start += width
            cached = self.masks[key] = (mask, scale)
        return cached


class GroupedLoRA:
    """Every resident adapter's LoRA on a model's linear layers, added by a forward hook on each layer
    an adapter touches, for the rows of the forward pass in progress (`rows`). Changed only on the
    engine thread, between forward passes."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._modules = {name: module for name, module in model.named_modules()
                         if isinstance(module, torch.nn.Linear)}
        self._layers: dict[str, _Layer] = {}  # by module name, once an adapter touches it
        self._by_module: dict[int, _Layer] = {}  # the same, by the module's id (for the hook)
        self._plan: _Plan | None = None

    def add(self, adapter: str, layers: Mapping[str, LayerWeights]) -> None:
        """Install `adapter`'s weights (from `lora_weights.read_lora`, checked against this model)."""
        for module_name, weights in layers.items():
            layer = self._layers.get(module_name)
            if layer is None:
                module = self._modules[module_name]
                layer = self._layers[module_name] = self._by_module[id(module)] = _Layer({})
                module.register_forward_hook(self._add_lora)
            layer.weights[adapter] = weights
            layer.stacked = None

    def remove(self, adapter: str) -> None:
        for layer in self._layers.values():
            if layer.weights.pop(adapter, None) is not None:
                layer.stacked = None

    @contextmanager
    def rows(self, names: Sequence[str]) -> Iterator[None]:
        """The forward passes inside run row i on adapter `names[i]` (BASE: none)."""
        present = tuple(sorted({n for n in names if n != BASE}))
        uniform = present[0] if len(present) == 1 and all(n != BASE for n in names) else None
        self._plan = _Plan(tuple(names), present, uniform)
        try:
            yield
        finally:
            self._plan = None

    def _add_lora(self, module: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        plan = self._plan
        if plan is None or not plan.present:
            return output
        layer = self._by_module[id(module)]
        x = args[0]
        if plan.uniform is not None:
            if plan.uniform not in layer.weights:
                return output
            a, b, scaling = layer.weights[plan.uniform]
            return output + (F.linear(F.linear(x.to(a.dtype), a), b) * scaling).to(output.dtype)
        if x.shape[0] != len(plan.rows):
            raise EngineFailureError("a mixed-adapter batch reached a LoRA layer whose input is not one row per "
                                     "sequence")
        stacked = layer.stack(plan.present)
        if stacked is None:  # no row's adapter touches this layer
            return output
        a, b, layout = stacked
        mask, scale = plan.mask(layout, a.dtype)
        if x.dim() > 2:  # [rows, positions, features]: one mask row per sequence, for all its positions
            mask, scale = mask.unsqueeze(1), scale.unsqueeze(1)
        return output + (F.linear(F.linear(x.to(a.dtype), a) * mask, b) * scale).to(output.dtype)
