"""The embedded engine's continuous batch: which sequences run, when waiting ones join, and how each
step's tokens are turned into output.

Between two decode steps waiting requests are admitted (at most `max_prefill_tokens` prompt tokens
per step: one prefill of a whole burst would stall every running row, and the aborts of clients
that gave up, for seconds on a CPU), prefilled together and merged into the running KV cache
(`kv_batch`); then one forward pass decodes a token for every running row, whatever its adapter,
and finished or aborted rows are retired. The model itself stays with the engine: the scheduler
calls `forward(rows, input_ids, attention_mask, positions, cache)` (cache None: a prefill), which
adds the rows' adapters and images. Everything here runs on the engine's one worker thread.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from service.engine import kv_batch
from service.engine.base import SamplingParams, TokenDelta, TokenLogprob
from service.engine.errors import EngineFailureError, GenerationInterruptedError
from service.engine.grammar import RowGrammar, TokenMask
from service.engine.logprobs import StepLogprobs
from service.engine.output import OutputBuilder
from service.engine.sampler import sample
from service.engine.vision import VisionPrompt, decode_positions
from service.settings import Settings

Forward = Callable[[list["Row"], torch.Tensor, torch.Tensor, torch.Tensor, Any], tuple[torch.Tensor, Any]]


@dataclass
class Row:
    """One request's sequence in the batch."""

    request_id: str
    prompt_ids: list[int]
    adapter: str  # the engine's name of the adapter, or its name for the bare base model
    params: SamplingParams
    emit: Callable[[TokenDelta | BaseException], None]
    output: OutputBuilder
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)  # generated so far: the penalties read them
    position: int = 0
    aborted: bool = False
    vision: VisionPrompt | None = None  # images of a vision-language prompt, consumed by its prefill
    rope_delta: int = 0
    grammar: RowGrammar | None = None  # structured output: the row's matcher, which masks its logits


class Scheduler:
    def __init__(self, settings: Settings, forward: Forward, pad_id: int, is_loaded: Callable[[str], bool]):
        self.settings = settings
        self.forward = forward
        self.pad_id = pad_id
        self.is_loaded = is_loaded  # a waiting row whose adapter was unloaded meanwhile must not start
        self.waiting: queue.Queue[Row] = queue.Queue()
        self.held: Row | None = None  # taken from `waiting`, over the last step's prefill budget
        self.running: list[Row] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None
        self.token_mask = TokenMask()  # structured output's one bitmask for the batch
        self.last_tokens: list[int] = []
        self.batch_size = 0
        self.steps = 0
        self.last_step = ""  # what the last `step` did, for the engine's slow-work log line

    def pending(self) -> int:
        return self.waiting.qsize() + (self.held is not None)

    def step(self) -> bool:
        """Retire, admit, retire, decode: one turn of the loop. False when there was nothing to do."""
        self.last_step = ""
        self.retire_finished()
        admitted = self.admit()
        self.retire_finished()
        if self.running:
            self.decode()
            return True
        return admitted

    def admit(self) -> bool:
        room = self.settings.max_batch_size - len(self.running)
        budget = self.settings.max_prefill_tokens
        new: list[Row] = []
        while room > 0:
            row = self._next_waiting()
            if row is None:
                break
            if row.aborted:
                continue
            if not self.is_loaded(row.adapter):
                row.emit(GenerationInterruptedError("the request's adapter was unloaded before it started; retry"))
                continue
            if new and (len(row.prompt_ids) > budget or self._apart(row, new)):
                self.held = row
                break
            new.append(row)
            budget -= len(row.prompt_ids)
            room -= 1
        if not new:
            return False
        try:
            self._prefill(new)
        except BaseException as exc:
            # rows that never joined the batch would otherwise wait for a token forever
            for row in new:
                if row not in self.running:
                    row.emit(EngineFailureError(f"generation failed ({type(exc).__name__}; see the server log)"))
            raise
        return True

    @staticmethod
    def _apart(row: Row, new: list[Row]) -> bool:
        """A prefill with images holds rows of one adapter: a vision tower's inputs are the images'
        patches, not one row per sequence, so a LoRA on the tower needs the whole pass on one adapter
        (`grouped_lora`; peft's `adapter_names` picked wrong rows there)."""
        images = row.vision is not None or any(r.vision is not None for r in new)
        return images and any(r.adapter != row.adapter for r in new)

    def _next_waiting(self) -> Row | None:
        if self.held is not None:
            row, self.held = self.held, None
            return row
        try:
            return self.waiting.get_nowait()
        except queue.Empty:
            return None

    def _prefill(self, new: list[Row]) -> None:
        length = max(len(r.prompt_ids) for r in new)
        self.last_step = f"prefill of {len(new)} rows, {sum(len(r.prompt_ids) for r in new)} prompt tokens; "
        input_ids = torch.tensor([[self.pad_id] * (length - len(r.prompt_ids)) + r.prompt_ids for r in new])
        mask = torch.tensor([[0] * (length - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in new])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self.forward(new, input_ids, mask, positions, None)
        self.token_mask.apply(logits, [r.grammar for r in new])  # as vLLM: before logprobs and sampling
        logprobs = StepLogprobs(logits, new)  # the raw distribution, before sampling shapes it
        tokens = sample(logits, new)
        for row in new:
            row.position = len(row.prompt_ids)
            row.vision = None  # pixels are in the KV cache now
        if self.running:
            self.cache, self.mask = kv_batch.merge(self.cache, self.mask, cache, mask)
        else:
            self.cache, self.mask = cache, mask
        self.running.extend(new)
        self.last_tokens.extend(tokens)
        self._accept(new, tokens, logprobs.of(tokens))

    def decode(self) -> None:
        assert self.mask is not None
        input_ids = torch.tensor(self.last_tokens).unsqueeze(1)
        self.mask = torch.cat([self.mask, torch.ones(len(self.running), 1, dtype=self.mask.dtype)], dim=1)
        positions = decode_positions([r.position for r in self.running], [r.rope_delta for r in self.running])
        self.batch_size = len(self.running)
        self.last_step += f"decode of {len(self.running)} rows over {self.mask.shape[1]} positions"
        logits, self.cache = self.forward(self.running, input_ids, self.mask, positions, self.cache)
        self.token_mask.apply(logits, [r.grammar for r in self.running])
        logprobs = StepLogprobs(logits, self.running)
        tokens = sample(logits, self.running)
        for row in self.running:
            row.position += 1
        self.last_tokens = tokens
        self.steps += 1
        self._accept(self.running, tokens, logprobs.of(tokens))

    def _accept(self, rows: list[Row], tokens: list[int], logprobs: list[TokenLogprob | None]) -> None:
        """Each row's new token through its output builder; rows that finished are retired next."""
        for row, token, logprob in zip(rows, tokens, logprobs, strict=True):
            if row.aborted:
                continue
            if row.grammar is not None and not row.grammar.accept(token):  # never expected: it was masked
                row.aborted = True
                row.emit(EngineFailureError("the constrained generation failed (see the server log)"))
                continue
            row.output_ids.append(token)
            delta = row.output.step([token], logprobs=[logprob] if logprob is not None else ())
            if delta is not None:
                row.emit(delta)
            if row.output.finished:
                row.aborted = True  # done: retired before the next step

    def retire_finished(self) -> None:
        keep = [i for i, r in enumerate(self.running) if not r.aborted]
        if len(keep) == len(self.running):
            return
        if not keep:
            self.clear()
            return
        self.cache, self.mask = kv_batch.select_rows(self.cache, self.mask, keep)
        self.running = [self.running[i] for i in keep]
        self.last_tokens = [self.last_tokens[i] for i in keep]

    def interrupt(self, adapter: str, message: str) -> None:
        """End the running rows of an adapter that is being unloaded: an error, never a hang."""
        for row in self.running:
            if row.adapter == adapter and not row.aborted:
                row.aborted = True
                row.emit(GenerationInterruptedError(message))
        self.retire_finished()

    def fail_running(self, exc: BaseException) -> None:
        """A step failed: fail the batch, not the process."""
        for row in self.running:
            row.emit(EngineFailureError(f"generation failed ({type(exc).__name__}; see the server log)"))
        self.clear()

    def stop(self) -> None:
        """The engine stops: every running and waiting row ends with an error."""
        for row in [*self.running, *self._drain_waiting()]:
            row.emit(GenerationInterruptedError("the engine stopped"))
        self.clear()

    def clear(self) -> None:
        self.running, self.cache, self.mask, self.last_tokens = [], None, None, []

    def _drain_waiting(self) -> list[Row]:
        out = [self.held] if self.held is not None else []
        self.held = None
        while True:
            try:
                out.append(self.waiting.get_nowait())
            except queue.Empty:
                return out
