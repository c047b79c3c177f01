"""vLLM's LoRA request bodies (`vllm/entrypoints/serve/lora/protocol.py`), with our bounds: the
same fields, so a vLLM user's script sends them unchanged; unknown fields are ignored, as vLLM does."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1, max_length=64)
    lora_path: str = Field(min_length=1, max_length=4096,
                           description="adapter folder, below the adapter root (absolute or relative to it)")
    load_inplace: bool = Field(False, description="replace a serving adapter of that name with a new version")
    is_3d_lora_weight: bool = Field(False, description="not supported: true is refused")


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1, max_length=64)
    lora_int_id: int | None = Field(None, description="ignored: ids are the service's own")
