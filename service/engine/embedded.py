"""The embedded engine: transformers + peft on the CPU (or a single GPU), every adapter resident.

One base model is wrapped once in a `PeftModel`; each registered adapter version is loaded into
it under its own name. A single worker thread owns the model (so adapter loads never race a
forward pass) and runs a continuous-batching loop: between two decode steps it admits waiting
requests (prefilled together, then merged into the running KV cache), decodes one token for every
running sequence in one forward pass with peft's per-row `adapter_names` (a mixed-adapter batch),
and retires finished or aborted rows. Async callers talk to it through thread-safe queues.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from service.adapter_validation import module_names
from service.base_model import BaseModelInfo, load_base_model
from service.engine import kv_batch, scorer
from service.engine.base import AdapterRef, Engine, SamplingParams, TokenDelta
from service.engine.text_stream import TextStream
from service.engine.vision import VisionInputs, VisionPrompt, decode_positions, mrope_positions
from service.errors import (
    AdapterValidationError,
    BadRequestError,
    EngineError,
    GenerationInterruptedError,
    ServiceUnavailableError,
)
from service.settings import Settings

log = logging.getLogger(__name__)

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch
# below this temperature sampling is greedy (as in vLLM): 1/T overflows the logits long before T reaches 0
SAMPLING_EPS = 1e-5
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def peft_name(adapter: AdapterRef) -> str:
    """peft keys adapters by module-dict names, which may not contain dots."""
    return f"{adapter.name}__v{adapter.version}".replace(".", "_")


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    adapter: str  # peft adapter name or BASE
    params: SamplingParams
    emit: Callable[[TokenDelta], None]
    stream: TextStream
    generator: torch.Generator | None = None
    position: int = 0
    generated: int = 0
    aborted: bool = False
    eos: set[int] = field(default_factory=set)
    vision: VisionPrompt | None = None  # images of a vision-language prompt, consumed by its prefill
    rope_delta: int = 0


class EmbeddedEngine(Engine):
    name = "hf"

    def __init__(self, settings: Settings, base: BaseModelInfo):
        self.settings = settings
        self.base = base
        self._tokenizer: Any = None
        self._model: Any = None  # PeftModel once the first adapter is loaded, else the bare model
        self._module_names: set[str] = set()
        self._vision: VisionInputs | None = None  # set for vision-language base models
        self._adapters: dict[str, AdapterRef] = {}
        self._commands: queue.Queue[tuple[Callable[[], Any], Future]] = queue.Queue()
        self._waiting: queue.Queue[_Request] = queue.Queue()
        self._held: _Request | None = None  # taken from _waiting, over the last step's prefill budget
        self._requests: dict[str, _Request] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._running: list[_Request] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self._last_tokens: list[int] = []
        self._eos: set[int] = set()
        self._prefix_cache: dict[tuple[str, tuple[int, ...]], Any] = {}
        self.batch_size = 0
        self.steps = 0

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.to_thread(self._load)
        self._thread = threading.Thread(target=self._loop, name="embedded-engine", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(self.base.path)
        model = load_base_model(self.base.path, DTYPES[self.settings.dtype])
        model.eval()
        self._model = model
        self._vision = VisionInputs.for_model(self.base.path, model)
        self._module_names = module_names(model)
        gen_eos = model.generation_config.eos_token_id
        eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        self._eos = {int(e) for e in [*eos, self._tokenizer.eos_token_id] if e is not None}

    async def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def module_names(self) -> set[str]:
        return self._module_names

    @property
    def accepts_images(self) -> bool:
        return self._vision is not None

    def _prepare_images(self, ids: Sequence[int], images: Sequence[Any]) -> VisionPrompt:
        if self._vision is None:
            raise BadRequestError("the base model does not accept images", param="messages")
        return self._vision.prepare(ids, images, self._model.dtype)

    def _vision_kwargs(self, prompts: list[VisionPrompt | None], positions: torch.Tensor) -> dict[str, Any]:
        """Forward arguments for a (prefill) batch: MRoPE positions and pixels when any row has images."""
        if all(p is None for p in prompts):
            return {"position_ids": positions}
        present = [p for p in prompts if p is not None]
        return {
            "position_ids": mrope_positions(positions, [p.mrope if p else None for p in prompts]),
            "pixel_values": torch.cat([p.pixel_values for p in present]),
            "image_grid_thw": torch.cat([p.image_grid_thw for p in present]),
        }

    def stats(self) -> dict[str, Any]:
        return {
            "waiting": self._waiting.qsize() + (self._held is not None),
            "running": len(self._running),
            "batch_size": self.batch_size,
            "adapters_loaded": len(self._adapters),
        }

    # ---- adapters ----------------------------------------------------------------------------
    async def add_adapter(self, adapter: AdapterRef) -> None:
        await self._call(lambda: self._add_adapter(adapter))

    def _add_adapter(self, adapter: AdapterRef) -> None:
        from peft import PeftModel

        name = peft_name(adapter)
        if name in self._adapters:
            return
        try:
            if isinstance(self._model, PeftModel):
                self._model.load_adapter(str(adapter.path), adapter_name=name, use_safetensors=True)
            else:
                self._model = PeftModel.from_pretrained(
                    self._model, str(adapter.path), adapter_name=name, use_safetensors=True
                )
        except Exception as exc:  # peft raises many types for bad weights; none may take the server down
            log.warning("peft refused adapter %s: %s", adapter.key, exc)
            raise AdapterValidationError(f"adapter {adapter.key} failed to load: peft refused its weights "
                                         f"({type(exc).__name__}; the server log has the details)",
                                         param="path") from exc
        self._model.eval()
        self._adapters[name] = adapter

    async def remove_adapter(self, adapter: AdapterRef) -> None:
        await self._call(lambda: self._remove_adapter(adapter))

    def _remove_adapter(self, adapter: AdapterRef) -> None:
        name = peft_name(adapter)
        if name not in self._adapters:
            return
        for req in self._running:
            if req.adapter == name and not req.aborted:
                req.aborted = True
                req.emit(GenerationInterruptedError(f"adapter {adapter.key} was unloaded while generating; "
                                                    "retry"))  # never a hang
        self._retire_finished()
        if len(self._adapters) == 1:
            # peft keeps at least one adapter; unwrap back to the bare model instead
            self._model = self._model.unload()
        else:
            self._model.delete_adapter(name)
        del self._adapters[name]
        self._prefix_cache = {k: v for k, v in self._prefix_cache.items() if k[0] != name}

    def loaded_adapters(self) -> list[str]:
        return sorted(a.key for a in self._adapters.values())

    def _adapter_name(self, adapter: AdapterRef | None) -> str:
        if adapter is None:
            return BASE
        name = peft_name(adapter)
        if name not in self._adapters:
            raise EngineError(f"adapter {adapter.key} is not loaded")
        return name

    # ---- generation ----------------------------------------------------------------------------
    async def generate(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        adapter: AdapterRef | None,
        params: SamplingParams,
        images: Sequence[Any] = (),
    ) -> AsyncIterator[TokenDelta]:
        if self._thread is None or self._stop.is_set():
            raise ServiceUnavailableError("engine is not running")
        vision = None
        if images:
            vision = await asyncio.to_thread(self._prepare_images, prompt_ids, images)
            prompt_ids = vision.ids
            if len(prompt_ids) + params.max_tokens > self.settings.max_model_len:
                raise BadRequestError(
                    f"prompt has {len(prompt_ids)} tokens with its images and {params.max_tokens} new tokens were "
                    f"asked for; the context length is {self.settings.max_model_len}", param="messages")
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[TokenDelta | BaseException] = asyncio.Queue()
        generator = None
        if params.temperature > 0:
            generator = torch.Generator()
            generator.manual_seed(params.seed if params.seed is not None else int(time.time_ns() % 2**63))
        req = _Request(
            request_id=request_id,
            prompt_ids=list(prompt_ids),
            adapter=self._adapter_name(adapter),
            params=params,
            emit=lambda item: loop.call_soon_threadsafe(out.put_nowait, item),
            stream=TextStream(self._tokenizer, params.stop),
            generator=generator,
            vision=vision,
            rope_delta=vision.rope_delta if vision else 0,
        )
        self._requests[request_id] = req
        self._waiting.put(req)
        self._wake.set()
        finished = False
        try:
            while True:
                item = await out.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:
                req.aborted = True
                self._wake.set()
            self._requests.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        req = self._requests.get(request_id)
        if req is not None and not req.aborted:
            req.aborted = True
            req.emit(GenerationInterruptedError("the generation was aborted"))  # its reader must not wait on
            self._wake.set()

    # ---- scoring (routing) ---------------------------------------------------------------------
    async def next_token_logprobs(
        self,
        prompt_ids: Sequence[int],
        adapter: AdapterRef | None,
        token_ids: Sequence[int],
        prefix_len: int = 0,
        images: Sequence[Any] = (),
    ) -> list[float]:
        def run() -> list[float]:
            logits, _, _, _ = self._prompt_state(list(prompt_ids), self._adapter_name(adapter), prefix_len, images)
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            return [float(logprobs[t]) for t in token_ids]

        return await self._call(run)

    async def sequence_logprobs(
        self,
        prompt_ids: Sequence[int],
        adapter: AdapterRef | None,
        continuations: Sequence[Sequence[int]],
        images: Sequence[Any] = (),
        prefix_len: int = 0,
    ) -> list[float]:
        """Text prompts: one forward over the user's part of the prompt and the names' prefix tree
        (`scorer.packed_logprobs`); with images: one prefill, then one batched pass over the names."""

        def run() -> list[float]:
            name = self._adapter_name(adapter)
            ids = list(prompt_ids)
            if not images:
                cache, past = self._cached_prefix(ids, name, prefix_len)
                return scorer.packed_logprobs(self._model, cache, past, ids[past:], continuations,
                                              self._adapter_kwargs([name]))
            logits, cache, start, delta = self._prompt_state(ids, name, prefix_len, images)
            return scorer.continuation_logprobs(self._model, cache, logits, start, continuations,
                                                lambda rows: self._adapter_kwargs([name] * rows), delta,
                                                self._tokenizer.pad_token_id or 0)

        return await self._call(run)

    def _prompt_state(self, ids: list[int], adapter: str, prefix_len: int, images: Sequence[Any] = ()
                      ) -> tuple[torch.Tensor, Any, int, int | None]:
        """Prefill a scoring prompt: its next-token logits, its KV cache, its length (images
        expanded) and, with images, its MRoPE delta. The first `prefix_len` tokens (the router's
        fixed system prompt) are prefilled once per adapter and their KV reused, so a routing
        decision costs a prefill of the user's text only; prompts with images are prefilled whole
        (their positions depend on the images)."""
        from transformers import DynamicCache

        kwargs = self._adapter_kwargs([adapter])
        cache = DynamicCache(config=self._model.config)
        if images:
            vision = self._prepare_images(ids, images)
            kwargs |= self._vision_kwargs([vision], torch.arange(len(vision.ids)).unsqueeze(0))
            out = self._model(input_ids=torch.tensor([vision.ids]), past_key_values=cache, use_cache=True,
                              logits_to_keep=1, **kwargs)
            return out.logits[0, -1], cache, len(vision.ids), vision.rope_delta
        cache, past = self._cached_prefix(ids, adapter, prefix_len)
        out = self._model(input_ids=torch.tensor([ids[past:]]), past_key_values=cache,
                          position_ids=torch.arange(past, len(ids)).unsqueeze(0), use_cache=True, logits_to_keep=1,
                          **kwargs)
        return out.logits[0, -1], cache, len(ids), None

    def _cached_prefix(self, ids: list[int], adapter: str, prefix_len: int) -> tuple[Any, int]:
        """A cache holding the prompt's first `prefix_len` tokens under `adapter` (the router's fixed
        system prompt, prefilled once per adapter and shared, never written to) and that length; an
        empty cache and 0 when there is no such prefix or nothing would follow it."""
        from transformers import DynamicCache

        if prefix_len <= 0 or prefix_len >= len(ids):
            return DynamicCache(config=self._model.config), 0
        key = (adapter, tuple(ids[:prefix_len]))
        cached = self._prefix_cache.get(key)
        if cached is None:
            cached = DynamicCache(config=self._model.config)
            self._model(input_ids=torch.tensor([ids[:prefix_len]]), past_key_values=cached, use_cache=True,
                        logits_to_keep=1, **self._adapter_kwargs([adapter]))
            if len(self._prefix_cache) >= 16:
                self._prefix_cache.pop(next(iter(self._prefix_cache)))
            self._prefix_cache[key] = cached
        return kv_batch.fork(cached, self._model.config), prefix_len

    # ---- worker thread ---------------------------------------------------------------------------
    async def _call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the engine thread between two steps and await its result."""
        if self._thread is None:
            return await asyncio.to_thread(fn)
        future: Future = Future()
        self._commands.put((fn, future))
        self._wake.set()
        return await asyncio.wrap_future(future)

    def _adapter_kwargs(self, names: list[str]) -> dict[str, Any]:
        from peft import PeftModel

        if isinstance(self._model, PeftModel):
            return {"adapter_names": names}
        if any(n != BASE for n in names):
            raise EngineError("no adapters are loaded")
        return {}

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            try:
                with torch.inference_mode():
                    self._run_commands()
                    self._retire_finished()
                    admitted = self._admit()
                    self._retire_finished()
                    if self._running:
                        self._decode_step()
                    elif not admitted:
                        self._wake.wait(timeout=0.5)
                        self._wake.clear()
            except Exception as exc:  # keep serving: fail the batch, not the process
                log.exception("engine step failed")
                for req in self._running:
                    req.emit(EngineError(f"generation failed ({type(exc).__name__}; see the server log)"))
                self._running, self._cache, self._mask, self._last_tokens = [], None, None, []
        for req in [*self._running, *self._drain_waiting()]:
            req.emit(GenerationInterruptedError("the engine stopped"))

    def _drain_waiting(self) -> list[_Request]:
        out = [self._held] if self._held is not None else []
        self._held = None
        while True:
            try:
                out.append(self._waiting.get_nowait())
            except queue.Empty:
                return out

    def _run_commands(self) -> None:
        while True:
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

    def _next_waiting(self) -> _Request | None:
        if self._held is not None:
            req, self._held = self._held, None
            return req
        try:
            return self._waiting.get_nowait()
        except queue.Empty:
            return None

    def _admit(self) -> bool:
        """Move waiting requests into the batch, at most `max_prefill_tokens` prompt tokens per step:
        one prefill of a whole burst would stall every running row (and the aborts of clients that
        gave up) for seconds on a CPU; the rest join between the next decode steps."""
        room = self.settings.max_batch_size - len(self._running)
        budget = self.settings.max_prefill_tokens
        new: list[_Request] = []
        while room > 0:
            req = self._next_waiting()
            if req is None:
                break
            if req.aborted:
                continue
            if req.adapter != BASE and req.adapter not in self._adapters:
                req.emit(GenerationInterruptedError("the request's adapter was unloaded before it started; retry"))
                continue
            if new and len(req.prompt_ids) > budget:
                self._held = req
                break
            new.append(req)
            budget -= len(req.prompt_ids)
            room -= 1
        if not new:
            return False
        try:
            self._prefill(new)
        except BaseException as exc:
            # rows that never joined the batch would otherwise wait for a token forever
            for req in new:
                if req not in self._running:
                    req.emit(EngineError(f"generation failed ({type(exc).__name__}; see the server log)"))
            raise
        return True

    def _prefill(self, new: list[_Request]) -> None:
        from transformers import DynamicCache

        length = max(len(r.prompt_ids) for r in new)
        pad = self._tokenizer.pad_token_id or 0
        input_ids = torch.tensor([[pad] * (length - len(r.prompt_ids)) + r.prompt_ids for r in new])
        mask = torch.tensor([[0] * (length - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in new])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self._model.config)
        out = self._model(
            input_ids=input_ids,
            attention_mask=mask,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
            **self._vision_kwargs([r.vision for r in new], positions),
            **self._adapter_kwargs([r.adapter for r in new]),
        )
        tokens = self._sample(out.logits[:, -1, :], new)
        for req in new:
            req.position = len(req.prompt_ids)
            req.vision = None  # pixels are in the KV cache now
        if self._running:
            self._cache, self._mask = kv_batch.merge(self._cache, self._mask, out.past_key_values, mask)
        else:
            self._cache, self._mask = out.past_key_values, mask
        self._running.extend(new)
        self._last_tokens.extend(tokens)
        self._accept(new, tokens)

    def _decode_step(self) -> None:
        input_ids = torch.tensor(self._last_tokens).unsqueeze(1)
        self._mask = torch.cat([self._mask, torch.ones(len(self._running), 1, dtype=self._mask.dtype)], dim=1)
        positions = decode_positions([r.position for r in self._running], [r.rope_delta for r in self._running])
        self.batch_size = len(self._running)
        out = self._model(
            input_ids=input_ids,
            attention_mask=self._mask,
            position_ids=positions,
            past_key_values=self._cache,
            use_cache=True,
            logits_to_keep=1,
            **self._adapter_kwargs([r.adapter for r in self._running]),
        )
        self._cache = out.past_key_values
        tokens = self._sample(out.logits[:, -1, :], self._running)
        for req in self._running:
            req.position += 1
        self._last_tokens = tokens
        self.steps += 1
        self._accept(self._running, tokens)

    def _sample(self, logits: torch.Tensor, reqs: list[_Request]) -> list[int]:
        greedy = logits.argmax(dim=-1).tolist()
        tokens = []
        for row, req in enumerate(reqs):
            p = req.params
            if p.temperature < SAMPLING_EPS:
                tokens.append(int(greedy[row]))
                continue
            probs = torch.softmax(logits[row].float() / p.temperature, dim=-1)
            if p.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                keep = sorted_probs.cumsum(0) - sorted_probs < p.top_p
                sorted_probs = sorted_probs * keep
                probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
            if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
                # one row's extreme settings must not fail the whole batch's step: greedy is its limit
                tokens.append(int(greedy[row]))
                continue
            tokens.append(int(torch.multinomial(probs, 1, generator=req.generator)))
        return tokens

    def _accept(self, reqs: list[_Request], tokens: list[int]) -> None:
        """Turn each new token into a delta; mark rows that finished."""
        limit = self.settings.max_model_len
        for req, token in zip(reqs, tokens, strict=True):
            if req.aborted:
                continue
            req.generated += 1
            finish = None
            if token in self._eos:
                text = req.stream.flush()
                finish = "stop"
            else:
                text = req.stream.push(token)
                if req.stream.stopped:
                    finish = "stop"
                elif req.generated >= req.params.max_tokens or req.position + 1 >= limit:
                    text += req.stream.flush()
                    finish = "length"
            req.emit(TokenDelta(text, req.generated, finish, [token]))
            if finish is not None:
                req.aborted = True  # done: retired before the next step

    def _retire_finished(self) -> None:
        keep = [i for i, r in enumerate(self._running) if not r.aborted]
        if len(keep) == len(self._running):
            return
        if not keep:
            self._running, self._cache, self._mask, self._last_tokens = [], None, None, []
            return
        self._cache, self._mask = kv_batch.select_rows(self._cache, self._mask, keep)
        self._running = [self._running[i] for i in keep]
        self._last_tokens = [self._last_tokens[i] for i in keep]

