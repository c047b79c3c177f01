"""The embedded engine: transformers on the CPU (or a single GPU), every adapter resident.

One base model as transformers builds it; every registered adapter version is its LoRA tensors
(`lora_weights`, read off the engine thread), applied by `grouped_lora` to each row of a batch with
its own adapter: one pair of matrix products per layer for all the adapters of a mixed batch,
peft's numbers (the parity tests hold it to plain peft). A single worker thread owns the model (so
adapter changes never race a forward pass) and runs the continuous batch (`scheduler`: admission,
prefill, one decode step for every running sequence), with the tokens drawn by `sampler` and
routing scored by `scorer`. This module holds the model, its adapters and the forward pass; async
callers talk to the thread through thread-safe queues.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from typing import Any

import torch

from service.adapter_validation import BaseModules, modules_of
from service.base_model import BaseModelInfo, load_base_model
from service.engine import kv_batch, scorer
from service.engine.base import AdapterRef, Engine, SamplingParams, TokenDelta
from service.engine.errors import (
    AdapterRefusedError,
    EngineFailureError,
    EngineUnavailableError,
    GenerationInterruptedError,
    InputRefusedError,
    refuse_overflow,
)
from service.engine.grammar import GrammarCompiler
from service.engine.grouped_lora import BASE, GroupedLoRA
from service.engine.lora_weights import LayerWeights, read_lora
from service.engine.output import OutputBuilder, end_of_sequence_ids
from service.engine.sampler import row_generator
from service.engine.scheduler import Row, Scheduler
from service.engine.vision import ImageSizes, VisionInputs, VisionPrompt, mrope_positions
from service.settings import Settings

log = logging.getLogger(__name__)

SLOW_WORK_S = 1.0  # engine-thread work longer than this stalls every running generation: logged

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def slow_work(started: float, what: str) -> None:
    """Log work on the engine thread that held up every generation for more than SLOW_WORK_S: the
    one place an operator sees why streams paused (a long prefill, a load, a long routing prompt)."""
    took = time.perf_counter() - started
    if took > SLOW_WORK_S and what:  # nothing to name: a turn of the loop with nothing to do
        log.warning("engine thread busy %.1fs: %s", took, what)


class EmbeddedEngine(Engine):
    name = "hf"

    def __init__(self, settings: Settings, base: BaseModelInfo):
        self.settings = settings
        self.base = base
        self._tokenizer: Any = None
        self._model: Any = None  # the base model as transformers built it; adapters live in `_lora`
        self._modules = BaseModules(frozenset(), {})
        self._vision: VisionInputs | None = None  # set for vision-language base models
        self._adapters: dict[str, AdapterRef] = {}
        self._commands: queue.Queue[tuple[Callable[[], Any], Future, str]] = queue.Queue()
        self._commands_lock = threading.Lock()
        self._requests: dict[str, Row] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._scheduler = Scheduler(settings, self._forward, 0, lambda name: name == BASE or name in self._adapters)
        self._eos: frozenset[int] = frozenset()
        self._grammars: GrammarCompiler | None = None  # structured output: xgrammar, for this tokenizer
        self._prefix_cache: dict[tuple[str, tuple[int, ...]], Any] = {}
        self._lora: GroupedLoRA | None = None  # every adapter's LoRA, each row on its own (set by start)
        self._threads = torch.get_num_threads()  # what `share_cpu(False)` goes back to

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
        self._modules = modules_of(model)
        self._lora = GroupedLoRA(model)
        self._eos = end_of_sequence_ids(self.base.path, self._tokenizer)
        # the logits' width (the model's vocabulary, which may be padded beyond the tokenizer's) is the
        # grammar masks' width; a complete grammar allows only the tokens that end a generation here
        vocab = model.get_output_embeddings().weight.shape[0]
        self._grammars = GrammarCompiler(self._tokenizer, vocab, self._eos)
        self._scheduler.pad_id = self._tokenizer.pad_token_id or 0

    async def share_cpu(self, sharing: bool) -> None:
        """Two processes whose OpenMP threads both want both cores spin against each other: a
        demo step took 5 s instead of 1.9 and a 24-token answer 20 s instead of 1.6 (2 cores). With
        this engine on one thread while the demo trains, answers take 3 s and training 2.1 s a step.
        Set on the engine thread, which is the thread whose parallel regions it sizes."""
        await self._call(lambda: torch.set_num_threads(1 if sharing else self._threads), "set threads")

    async def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def modules(self) -> BaseModules:
        return self._modules

    @property
    def image_sizes(self) -> ImageSizes | None:
        return self._vision.sizes if self._vision is not None else None

    def _prepare_images(self, ids: Sequence[int], images: Sequence[Any]) -> VisionPrompt:
        if self._vision is None:
            raise InputRefusedError("the base model does not accept images")
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
            "waiting": self._scheduler.pending(),
            "running": len(self._scheduler.running),
            "batch_size": self._scheduler.batch_size,
            "adapters_loaded": len(self._adapters),
        }

    # ---- adapters ----------------------------------------------------------------------------
    async def add_adapter(self, adapter: AdapterRef) -> None:
        """Read the adapter's tensors on a worker thread; only putting them in place waits for the
        engine thread (between two steps, microseconds), so a registration never pauses streams."""
        if adapter.key in self._adapters:
            return
        try:
            layers = await asyncio.to_thread(read_lora, adapter.path, self._modules.shapes)
        except AdapterRefusedError as exc:
            log.warning("adapter %s refused by the engine: %s", adapter.key, exc.message)
            raise AdapterRefusedError(f"adapter {adapter.key} failed to load: {exc.message}") from exc
        except Exception as exc:  # an unreadable file (changed since validation): never the server's end
            log.warning("adapter %s could not be read: %s", adapter.key, exc)
            raise AdapterRefusedError(f"adapter {adapter.key} failed to load: its weights could not be read "
                                      f"({type(exc).__name__}; the server log has the details)") from exc
        await self._call(lambda: self._install(adapter, layers), f"load {adapter.key}")

    def _install(self, adapter: AdapterRef, layers: dict[str, LayerWeights]) -> None:
        assert self._lora is not None  # set by start()
        if adapter.key not in self._adapters:
            self._lora.add(adapter.key, layers)
            self._adapters[adapter.key] = adapter

    async def remove_adapter(self, adapter: AdapterRef) -> None:
        await self._call(lambda: self._remove_adapter(adapter), f"unload {adapter.key}")

    def _remove_adapter(self, adapter: AdapterRef) -> None:
        name = adapter.key
        if name not in self._adapters:
            return
        self._scheduler.interrupt(name, f"adapter {adapter.key} was unloaded while generating; retry")
        assert self._lora is not None  # set by start()
        self._lora.remove(name)
        del self._adapters[name]
        self._prefix_cache = {k: v for k, v in self._prefix_cache.items() if k[0] != name}

    def loaded_adapters(self) -> list[str]:
        return sorted(self._adapters)

    def _adapter_name(self, adapter: AdapterRef | None) -> str:
        if adapter is None:
            return BASE
        if adapter.key not in self._adapters:
            raise EngineFailureError(f"adapter {adapter.key} is not loaded")
        return adapter.key

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
            raise EngineUnavailableError("engine is not running")
        vision = None
        if images:
            vision = await asyncio.to_thread(self._prepare_images, prompt_ids, images)
            prompt_ids = vision.ids
        # the request path checked already (images counted by their size); this is the engine's own
        # guarantee, on the ids it will run, that no sequence outgrows the context while decoding
        refuse_overflow(len(prompt_ids), params.max_tokens, self.settings.max_model_len)
        grammar = None
        if params.structured is not None:  # compiled before the row is queued, off the engine thread
            assert self._grammars is not None  # set by start()
            grammar = await self._grammars.row_grammar(params.structured)
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[TokenDelta | BaseException] = asyncio.Queue()
        req = Row(
            request_id=request_id,
            prompt_ids=list(prompt_ids),
            adapter=self._adapter_name(adapter),
            params=params,
            emit=lambda item: loop.call_soon_threadsafe(out.put_nowait, item),
            output=OutputBuilder(self._tokenizer, self._eos, params),
            generator=row_generator(params),
            vision=vision,
            rope_delta=vision.rope_delta if vision else 0,
            grammar=grammar,
        )
        self._requests[request_id] = req
        self._scheduler.waiting.put(req)
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

        return await self._call(run, f"score {len(prompt_ids)} prompt tokens")

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
                with self._rows([name]):
                    return scorer.packed_logprobs(self._model, cache, past, ids[past:], continuations)
            logits, cache, start, delta = self._prompt_state(ids, name, prefix_len, images)
            with self._rows([name]):  # every candidate's row on the one adapter
                return scorer.continuation_logprobs(self._model, cache, logits, start, continuations,
                                                    rope_delta=delta, pad_id=self._tokenizer.pad_token_id or 0)

        return await self._call(run, f"route {len(prompt_ids)} prompt tokens over {len(continuations)} names")

    def _prompt_state(self, ids: list[int], adapter: str, prefix_len: int, images: Sequence[Any] = ()
                      ) -> tuple[torch.Tensor, Any, int, int | None]:
        """Prefill a scoring prompt: its next-token logits, its KV cache, its length (images
        expanded) and, with images, its MRoPE delta. The first `prefix_len` tokens (the router's
        fixed system prompt) are prefilled once per adapter and their KV reused, so a routing
        decision costs a prefill of the user's text only; prompts with images are prefilled whole
        (their positions depend on the images)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self._model.config)
        if images:
            vision = self._prepare_images(ids, images)
            kwargs = self._vision_kwargs([vision], torch.arange(len(vision.ids)).unsqueeze(0))
            with self._rows([adapter]):
                out = self._model(input_ids=torch.tensor([vision.ids]), past_key_values=cache, use_cache=True,
                                  logits_to_keep=1, **kwargs)
            return out.logits[0, -1], cache, len(vision.ids), vision.rope_delta
        cache, past = self._cached_prefix(ids, adapter, prefix_len)
        with self._rows([adapter]):
            out = self._model(input_ids=torch.tensor([ids[past:]]), past_key_values=cache,
                              position_ids=torch.arange(past, len(ids)).unsqueeze(0), use_cache=True,
                              logits_to_keep=1)
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
            with self._rows([adapter]):
                self._model(input_ids=torch.tensor([ids[:prefix_len]]), past_key_values=cached, use_cache=True,
                            logits_to_keep=1)
            if len(self._prefix_cache) >= 16:
                self._prefix_cache.pop(next(iter(self._prefix_cache)))
            self._prefix_cache[key] = cached
        return kv_batch.fork(cached, self._model.config), prefix_len

    # ---- worker thread ---------------------------------------------------------------------------
    async def _call(self, fn: Callable[[], Any], what: str) -> Any:
        """Run `fn` on the engine thread between two steps and await its result; `what` names it in
        the slow-work log line."""
        if self._thread is None:
            return await asyncio.to_thread(fn)
        future: Future = Future()
        with self._commands_lock:  # never queued after the thread's last drain: it would wait for ever
            if self._stop.is_set():
                raise EngineUnavailableError("engine is shutting down")
            self._commands.put((fn, future, what))
        self._wake.set()
        return await asyncio.wrap_future(future)

    def _rows(self, names: list[str]) -> Any:
        """The context in which a forward pass runs row i on adapter `names[i]` (BASE: none)."""
        assert self._lora is not None  # set by start()
        if any(n != BASE and n not in self._adapters for n in names):
            raise EngineFailureError("an adapter of this batch is not loaded")
        return self._lora.rows(names)

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            try:
                with torch.inference_mode():
                    self._run_commands()
                    started = time.perf_counter()
                    stepped = self._scheduler.step()
                    slow_work(started, self._scheduler.last_step)
                    if not stepped:
                        self._wake.wait(timeout=0.5)
                        self._wake.clear()
            except Exception as exc:  # keep serving: fail the batch, not the process
                log.exception("engine step failed")
                self._scheduler.fail_running(exc)
        self._scheduler.stop()
        with self._commands_lock:  # what was queued but never run is told so, not left waiting
            while True:
                try:
                    _, future, _ = self._commands.get_nowait()
                except queue.Empty:
                    break
                if future.set_running_or_notify_cancel():
                    future.set_exception(EngineUnavailableError("engine is shutting down"))

    def _run_commands(self) -> None:
        while True:
            try:
                fn, future, what = self._commands.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            started = time.perf_counter()
            try:
                result = fn()
            except BaseException as exc:
                slow_work(started, what)
                future.set_exception(exc)
            else:
                slow_work(started, what)  # before the caller resumes: its log line comes first
                future.set_result(result)

    def _forward(self, rows: list[Row], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 positions: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        """The scheduler's forward pass over `rows`, each with its own adapter: a prefill (cache None:
        a fresh cache, the rows' images) or a decode step; the last position's logits and the cache."""
        from transformers import DynamicCache

        if cache is None:
            cache = DynamicCache(config=self._model.config)
            where = self._vision_kwargs([r.vision for r in rows], positions)
        else:
            where = {"position_ids": positions}
        with self._rows([r.adapter for r in rows]):
            out = self._model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                              use_cache=True, logits_to_keep=1, **where)
        return out.logits[:, -1, :], out.past_key_values

    @property
    def batch_size(self) -> int:
        """Rows in the last decode step."""
        return self._scheduler.batch_size
