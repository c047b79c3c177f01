"""What a deployment is made of, decided on the deploying machine: the `LORAMUX_MODAL_*` knobs and the
environment every container gets.

Why here, apart from the Modal objects: this module imports no `modal`, so the decisions (GPU count ->
tensor parallelism, which settings may reach production, the deadline under Modal's cuts) are plain
values a test can read, and every other module of the app builds its objects from `CONFIG`.

The containers import the app again, so they must rebuild the same objects: the resolved knobs travel
to them as `LORAMUX_MODAL_*` variables (`ModalConfig.to_env`). Service settings travel by an allow-list
(`FORWARDED_SETTINGS`): a deployer's local `LORAMUX_ALLOW_INSECURE`, `LORAMUX_ADMIN_OPEN` or API keys
never reach a public endpoint; the keys come from the Modal secret only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

MINUTES = 60
HOURS = 60 * MINUTES

# The production base model and the exact revision the adapters are trained against: a new upstream
# commit must not change the weights under registered adapters (their base checksum would no longer match).
PRODUCTION_BASE_MODEL = "Qwen/Qwen3-VL-8B-Instruct"
PRODUCTION_BASE_MODEL_REVISION = "0c351dd01ed87e9c1b53cbc748cba10e6187ff3b"

# Modal's web proxy answers a request whose response has not started within this many seconds with a
# 303 to a "result URL" (the input keeps running; a GET on that URL waits up to this long again). A
# stream has started, so it is never redirected; a non-streaming answer that takes longer needs a client
# that follows redirects (deploy/README.md, "Long requests").
MODAL_WEB_RESPONSE_CUTOFF_S = 150

# Where the volumes are mounted; the service settings point here (fixed: they must match the mounts).
MODELS_DIR = "/models"
ADAPTERS_DIR = "/adapters"
REGISTRY_DIR = "/registry"
REGISTRY_FILE = f"{REGISTRY_DIR}/loras.json"
VOLUME_SETTINGS = {
    "LORAMUX_CACHE_DIR": MODELS_DIR,
    "LORAMUX_ADAPTER_ROOT": ADAPTERS_DIR,
    "LORAMUX_REGISTRY": REGISTRY_FILE,
}

ENV_PREFIX = "LORAMUX_MODAL_"

# The service settings a deployer may set at `modal deploy` time (`LORAMUX_<NAME>`) and see in the
# containers: routing, limits, adapters, images. Not here, on purpose: keys and the switches that open
# an endpoint (secret or refused), what the deploy config decides (engine, model, dtype, context, batch,
# queue, deadline, tensor parallelism, volume paths), uvicorn's own knobs (Modal serves the ASGI app),
# and the image-URL private-address escape hatch.
FORWARDED_SETTINGS = frozenset({
    "base_model_name", "max_lora_rank", "registry_poll_s", "metrics_public", "cors_origins",
    "max_tokens_limit", "default_max_tokens", "max_messages", "max_stop", "max_choices", "max_body_bytes",
    "router_max_tokens", "router_max_prompt_tokens", "shutdown_grace_s",
    "max_images", "max_image_bytes", "max_image_pixels", "allow_image_urls", "image_fetch_timeout_s",
    "image_decode_workers", "image_fetch_concurrency", "image_url_hosts",
    "router", "route_threshold", "fallback", "shadow_fraction", "shadow_max_inflight",
    "gate_min_accuracy", "gate_max_recall_drop",
    "max_loras", "max_cpu_loras", "gpu_memory_utilization", "enforce_eager", "tower_lora",
})


def gpu_count(gpu: str) -> int:
    """GPUs in one Modal GPU string: `H100` -> 1, `H100:2` -> 2 (Modal's `TYPE:COUNT` form)."""
    _, sep, count = gpu.partition(":")
    if not sep:
        return 1
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"GPU {gpu!r}: the count after ':' must be a positive integer")
    return int(count)


@dataclass(frozen=True)
class ModalConfig:
    """Deploy-time knobs; each field is `LORAMUX_MODAL_<FIELD>` in the environment of `modal deploy`/`modal run`."""

    app_name: str = "loramux"
    gpu: str = "H100"  # any Modal GPU string: "H100", "A100-80GB", "L40S"; "H100:2" shards vLLM over two GPUs
    train_gpu: str = ""  # default: the same as `gpu`
    base_model: str = PRODUCTION_BASE_MODEL  # a Hugging Face hub id vLLM serves with LoRA
    base_model_revision: str = ""  # default: the pinned revision for the production model, else the hub's main
    max_model_len: int = 8192
    max_inputs: int = 64  # requests one container takes at once (they decode in one vLLM batch)
    target_inputs: int | None = None  # the autoscaler's target per container (default: max_inputs)
    min_containers: int = 0  # >0 keeps warm GPUs (no cold start, but billed while idle)
    max_containers: int | None = None  # upper bound on replicas (each one a full copy of the service)
    buffer_containers: int | None = None  # idle replicas kept ready above the current load
    scaledown_window: int = 15 * MINUTES  # idle seconds before a container stops (Modal allows 2..3600)
    startup_timeout: int = 30 * MINUTES  # first start downloads ~17 GB of weights and compiles
    request_timeout: int = 10 * MINUTES  # the longest one request may run (a stream, or a redirected answer)
    train_timeout: int = 6 * HOURS
    volume_reload_s: float = 10.0  # how often a serving container looks for new registrations
    models_volume: str = "loramux-models"
    adapters_volume: str = "loramux-adapters"
    registry_volume: str = "loramux-registry"
    registry_lock: str = "loramux-registry-lock"  # a modal.Dict: one registry writer at a time, every container
    api_keys_secret: str = "loramux-api-keys"  # holds LORAMUX_API_KEYS (and optionally LORAMUX_ADMIN_API_KEYS)
    hf_secret: str = "huggingface"  # holds HF_TOKEN (gated or private models; faster downloads)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ModalConfig:
        """Read `LORAMUX_MODAL_*`; a bad value fails the deploy at import, before anything is created."""
        values: dict[str, Any] = {}
        for spec in fields(cls):
            raw = environ.get(ENV_PREFIX + spec.name.upper(), "").strip()
            if not raw:
                continue
            kind = str(spec.type).replace(" | None", "")
            try:
                values[spec.name] = int(raw) if kind == "int" else float(raw) if kind == "float" else raw
            except ValueError as exc:
                raise ValueError(f"{ENV_PREFIX}{spec.name.upper()}={raw!r} is not a valid {kind}") from exc
        config = cls(**values)
        for gpu in (config.gpu, config.training_gpu):
            gpu_count(gpu)  # a bad count fails here too
        return config

    @property
    def training_gpu(self) -> str:
        return self.train_gpu or self.gpu

    @property
    def revision(self) -> str | None:
        """The pinned revision applies to the production model only; another model uses its own or main."""
        if self.base_model_revision:
            return self.base_model_revision
        return PRODUCTION_BASE_MODEL_REVISION if self.base_model == PRODUCTION_BASE_MODEL else None

    @property
    def base_model_setting(self) -> str:
        """`LORAMUX_BASE_MODEL`: `repo@revision`, which `service.base_model.resolve_base_model` downloads."""
        if self.revision and "@" not in self.base_model:
            return f"{self.base_model}@{self.revision}"
        return self.base_model

    @property
    def service_deadline_s(self) -> int:
        """`LORAMUX_REQUEST_TIMEOUT_S` of a serving container: below the Modal function's own timeout, which
        kills the input, so a client gets the service's 504 rather than a dropped connection. (Modal's
        150 s web cut is not a deadline: it redirects, see MODAL_WEB_RESPONSE_CUTOFF_S.)"""
        return max(1, self.request_timeout - 30)

    def to_env(self) -> dict[str, str]:
        """The resolved knobs, for the containers: they import the app again and must build the same objects
        (volume names, reload interval) as the deploying machine did."""
        return {ENV_PREFIX + f.name.upper(): str(getattr(self, f.name)) for f in fields(self)
                if getattr(self, f.name) not in (None, "")}


def forwarded_settings(environ: Mapping[str, str]) -> dict[str, str]:
    """The allow-listed `LORAMUX_*` service settings of the deploying machine's environment."""
    allowed = {f"LORAMUX_{name.upper()}" for name in FORWARDED_SETTINGS}
    return {key: value for key, value in environ.items() if key in allowed}


def container_env(config: ModalConfig, environ: Mapping[str, str], gpu: str) -> dict[str, str]:
    """Environment of a container on `gpu` (a Modal GPU string): the service settings for vLLM on CUDA
    (bf16, one engine over all of the container's GPUs), the allow-listed settings given at deploy time,
    the volume paths, and the resolved deploy config."""
    env = {
        "LORAMUX_ENGINE": "vllm",
        "LORAMUX_DTYPE": "bfloat16",
        "LORAMUX_MAX_MODEL_LEN": str(config.max_model_len),
        "LORAMUX_MAX_QUEUE": str(config.max_inputs),  # admission matches Modal's per-container concurrency
        "LORAMUX_MAX_BATCH_SIZE": str(config.max_inputs),  # and every admitted request decodes in the batch
        "LORAMUX_REQUEST_TIMEOUT_S": str(config.service_deadline_s),
        "LORAMUX_TENSOR_PARALLEL_SIZE": str(gpu_count(gpu)),  # `H100:2`: vLLM shards the model over both
    }
    env.update(forwarded_settings(environ))
    env.update(VOLUME_SETTINGS)
    env.update({
        "LORAMUX_BASE_MODEL": config.base_model_setting,
        "HF_HOME": f"{MODELS_DIR}/hf",  # hub metadata and xet cache live with the weights
        "VLLM_CACHE_ROOT": f"{MODELS_DIR}/vllm",  # torch.compile artifacts survive cold starts
        "HF_XET_HIGH_PERFORMANCE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    })
    env.update(config.to_env())
    return env


CONFIG = ModalConfig.from_env(os.environ)
