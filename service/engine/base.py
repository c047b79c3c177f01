"""The engine interface both engines implement, and the small value types that cross it.

The HTTP layer never touches torch or vLLM: it hands an engine token ids, an `AdapterRef` (or
None for the bare base model) and `SamplingParams`, and reads `TokenDelta`s from an async
iterator. Routing needs two scoring primitives, also here, so the router runs on either engine.
"""

from __future__ import annotations

import abc
import itertools
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from service.adapter_validation import BaseModules
    from service.engine.vision import ImageSizes

# OpenAI's own values: a generation the engine cuts short (adapter unloaded, aborted, engine stopped)
# does not finish, it raises `GenerationInterruptedError`, the same on both engines
FinishReason = Literal["stop", "length"]


class LoraIds:
    """vLLM integer LoRA ids for the whole process: one monotonic counter, so an id is handed out
    once and never again (not to a later version, not to a re-registered name, not by a second
    engine in the same process). An adapter version (name, version, folder) keeps its id for the
    life of the process, unloaded and loaded again included."""

    def __init__(self) -> None:
        self._counter = itertools.count(1)
        self._ids: dict[tuple[str, int, str], int] = {}
        self._lock = threading.Lock()

    def of(self, adapter: AdapterRef) -> int:
        key = (adapter.name, adapter.version, str(adapter.path))
        with self._lock:
            if key not in self._ids:
                self._ids[key] = next(self._counter)
            return self._ids[key]

    def fresh(self) -> int:
        """An id for a LoRA that is not an adapter version (the CPU build's null LoRA)."""
        with self._lock:
            return next(self._counter)


LORA_IDS = LoraIds()


@dataclass(frozen=True)
class AdapterRef:
    """A loadable adapter version: the engine handle of one registry version (the adapter manager
    makes one per loaded version). Its `lora_id` is the version's integer id for vLLM, from the one
    process-wide `LORA_IDS` (a reused id would serve stale prefix-cache blocks)."""

    name: str
    version: int
    path: Path  # validated folder holding adapter_config.json + adapter_model.safetensors
    rank: int = 0

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def lora_id(self) -> int:
        """Allocated once per (name, version, folder) and kept for the process's life, so a new version
        (or another adapter) can never inherit an old version's cached blocks."""
        return LORA_IDS.of(self)


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the answer's text, the shape of vLLM's `StructuredOutputsParams`: exactly one
    of the fields is set. The vLLM engine passes it to vLLM; the embedded engine compiles it with
    xgrammar (the library vLLM uses) and masks each constrained row's logits at every step."""

    json_schema: str | None = None  # a JSON schema, serialized (response_format json_schema, a forced tool call)
    json_object: bool = False  # any JSON object (response_format json_object)
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None  # EBNF, as xgrammar and vLLM take it
    # the request field it came from (response_format, structured_outputs, guided_json, tools, ...): an
    # engine that refuses the constraint names it, a field the engine's caller cannot guess (not part
    # of the constraint itself: equal constraints from different fields share one compiled grammar)
    param: str = field(default="response_format", compare=False)


@dataclass(frozen=True)
class SamplingParams:
    """What shapes one generation, the same fields and meanings as vLLM's `SamplingParams` so that
    both engines answer alike (0 / 1.0 values switch a processor off)."""

    max_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    top_k: int = 0  # 0 (or -1): off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # over prompt and output tokens, as vLLM and transformers apply it
    logprobs: int | None = None  # None: none; k: each token's log-probability and the k most likely at its step
    ignore_eos: bool = False  # go on past end-of-sequence tokens (benchmarks that want exact output lengths)
    structured: StructuredOutput | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability (from the model's distribution before temperature and
    penalties, as vLLM reports by default; after a structured-output mask, as in vLLM) and the `k`
    most likely tokens at that step, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class TokenDelta:
    """One step of a generation: new text (may be empty while a stop string is still possible),
    how many tokens were generated so far, and the finish reason on the last delta. `logprobs`, when
    the request asked for them, has one entry per id in `token_ids`."""

    text: str
    completion_tokens: int
    finish_reason: FinishReason | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)


class Engine(abc.ABC):
    """Async engine: one base model, many adapters resident at once."""

    name: str = "engine"

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the base model (and nothing else); called once before serving."""

    @abc.abstractmethod
    async def shutdown(self) -> None: ...

    @property
    @abc.abstractmethod
    def tokenizer(self) -> Any:
        """A Hugging Face tokenizer of the base model (chat template, encode/decode)."""

    @property
    @abc.abstractmethod
    def modules(self) -> BaseModules:
        """The base model's module names and linear widths, which adapters are validated against."""

    @property
    def accepts_images(self) -> bool:
        """Whether the base model is a vision-language model. Image requests to an engine that says
        no are refused (400) before they reach it. Images reach the engine as decoded PIL images,
        and the prompt carries one image placeholder token per image (the chat template's
        `<|image_pad|>`); the engine expands it to the image's patch count itself. Derived: an
        engine that accepts images is one that knows how its processor sizes them."""
        return self.image_sizes is not None

    @property
    def image_sizes(self) -> ImageSizes | None:
        """How the base model's image processor sizes images (its pixel cap, each image's token
        count), for the checks made before an image request reaches the engine; None when the
        model takes no images."""
        return None

    @abc.abstractmethod
    async def add_adapter(self, adapter: AdapterRef) -> None:
        """Make an adapter version resident; raises AdapterRefusedError (engine.errors) if its weights will not load."""

    @abc.abstractmethod
    async def remove_adapter(self, adapter: AdapterRef) -> None: ...

    @abc.abstractmethod
    def loaded_adapters(self) -> list[str]:
        """Keys (`name@version`) of the resident adapters."""

    @abc.abstractmethod
    def generate(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        adapter: AdapterRef | None,
        params: SamplingParams,
        images: Sequence[Any] = (),
    ) -> AsyncIterator[TokenDelta]:
        """Stream a generation. Closing the iterator early (client gone) aborts the request."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop a running request and free its batch slot; its stream raises
        `GenerationInterruptedError` (as it does when its adapter is removed while it runs)."""

    @abc.abstractmethod
    async def next_token_logprobs(
        self,
        prompt_ids: Sequence[int],
        adapter: AdapterRef | None,
        token_ids: Sequence[int],
        prefix_len: int = 0,
        images: Sequence[Any] = (),
    ) -> list[float]:
        """Log-probabilities of each of `token_ids` as the next token after the prompt (one prefill).
        `prefix_len` is a hint: that many leading tokens are the same on every call (the router's
        system prompt), so an engine may cache their KV instead of recomputing them."""

    @abc.abstractmethod
    async def sequence_logprobs(
        self,
        prompt_ids: Sequence[int],
        adapter: AdapterRef | None,
        continuations: Sequence[Sequence[int]],
        images: Sequence[Any] = (),
        prefix_len: int = 0,
    ) -> list[float]:
        """Total log-probability of each continuation after the prompt, for routing: the prompt is
        prefilled once and the continuations' remaining tokens are scored together over their prefix
        tree (each distinct prefix once), never one forward pass per continuation, so every label set
        is scored by the same rule.
        `prefix_len` is the same hint as for `next_token_logprobs`."""

    def stats(self) -> dict[str, Any]:
        """Numbers for /metrics and /ready: queue depth, running sequences, batch size."""
        return {}

    def size_lora(self, ranks: Sequence[int]) -> None:
        """The ranks of the adapters the registry holds, told before `start`: an engine whose LoRA
        slots have a fixed size (vLLM's `max_lora_rank`) sizes them to fit. Others ignore it."""
        return None

    async def share_cpu(self, sharing: bool) -> None:
        """Another heavy process (a demo training beside the server) wants this machine's cores:
        use one CPU thread while `sharing`, the start-up count again after. Engines that do not
        compute on this CPU ignore it."""
        return None
