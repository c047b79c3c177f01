"""What the service is compared with, measured in the benchmark's own process while no server runs:

- the seed's serving: one request at a time, `PeftModel.set_adapter` then `generate` (how the system
  we grew from answered). It serves one request at a time, so its tokens/s is the same at every
  concurrency; it is measured once per answer length and stands for every concurrency;
- the base model batched: transformers' `generate` over a batch of the point's prompts, no LoRA, no
  server (what the hardware gives a plain batched loop);
- the machine's matrix-multiply peak (float32 and bfloat16, torch's own GEMM on all the cores the
  service gets), and the FLOPs one decoded token costs, for the fraction of the peak the embedded
  engine reaches.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loadtests.bench_grid import ADAPTERS, PROMPTS, SEQUENTIAL_REQUESTS, Grid
from loadtests.bench_load import PointResult
from loadtests.bench_realistic import DemoSet
from service.base_model import BaseModelInfo
from service.prompts import end_of_turn_id, prompt_ids


def matmul_peak_gflops(dtype_name: str, size: int = 2048, seconds: float = 3.0) -> float:
    """The best GFLOP/s of square `size` matrix products in `dtype_name` over `seconds`."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)  # warm-up: thread pool, kernels
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - started) / 1e9)
    return best


def decode_flops_per_token(model: Any, context: int) -> float:
    """FLOPs of one decoded token: two per weight of every linear layer (the LM head included), plus
    attention over `context` positions (QK^T and AV, two FLOPs per multiply-add). LoRA's own products
    (rank 8 on two projections: under 1% of these) are left out."""
    import torch

    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 4 * config.num_hidden_layers * config.num_attention_heads * head_dim * context
    return float(2 * linear + attention)


def _timed_generate(model: Any, batch: list[list[int]], pad: int, new_tokens: int, eos: Any) -> tuple[int, float]:
    import torch

    width = max(map(len, batch))
    ids = torch.tensor([[pad] * (width - len(i)) + i for i in batch])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in batch])
    started = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad,
                         eos_token_id=eos)
    seconds = time.perf_counter() - started
    new = out[:, width:]
    # with an end of turn, a finished row is padded to the longest: count what each row produced
    return (int((new != pad).sum()) if eos is not None else new.numel()), seconds


def reference_figures(base: BaseModelInfo, paths: Mapping[str, Path], grid: Grid,
                      demo: DemoSet | None = None) -> dict[str, Any]:
    """The seed's serving per answer length, the base model batched at every point of `grid`, and
    (with the `demo`) the seed's serving of the realistic row."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base.path)
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = [prompt_ids(tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
    out: dict[str, Any] = {"base_batched": {}, "seed": {}}
    average_prompt = sum(map(len, ids)) / len(ids)
    with torch.inference_mode():
        out["flops_per_token"] = {f"t{t}": decode_flops_per_token(model, int(average_prompt + t / 2))
                                  for t in grid.new_tokens}
        _timed_generate(model, ids[:2], pad, 2, None)  # warm-up
        for c in grid.concurrency:
            for t in grid.new_tokens:
                batch = [ids[i % len(ids)] for i in range(c)]
                tokens, seconds = _timed_generate(model, batch, pad, t, None)
                out["base_batched"][f"c{c}_t{t}"] = PointResult(tokens / seconds, c / seconds, c, tokens,
                                                                seconds).to_json()
                print(f"  {'base model batched':<22} c={c:<3} tokens={t:<4} {tokens / seconds:8.1f} tok/s", flush=True)

        peft = PeftModel.from_pretrained(model, str(paths[ADAPTERS[0]]), adapter_name=ADAPTERS[0])
        for name in ADAPTERS[1:]:
            peft.load_adapter(str(paths[name]), adapter_name=name)
        peft.eval()
        for t in grid.new_tokens:
            count = SEQUENTIAL_REQUESTS.get(t, 3)
            generated, started = 0, time.perf_counter()
            for i in range(count):
                peft.set_adapter(ADAPTERS[i % len(ADAPTERS)])
                got, _ = _timed_generate(peft, [ids[i % len(ids)]], pad, t, None)
                generated += got
            seconds = time.perf_counter() - started
            out["seed"][f"t{t}"] = PointResult(generated / seconds, count / seconds, count, generated,
                                               seconds).to_json()
            print(f"  {'seed (one at a time)':<22} tokens={t:<4} {generated / seconds:8.1f} tok/s", flush=True)
        if demo is not None:
            out["seed"]["realistic"] = _seed_realistic(model, tokenizer, pad, demo)
    return out


def _seed_realistic(model: Any, tokenizer: Any, pad: int, demo: DemoSet) -> dict[str, Any]:
    """The seed's serving of the demo's eval requests: each answer ends at the end-of-turn token."""
    from peft import PeftModel

    paths, requests = demo.paths, demo.requests
    names = list(paths)
    peft = PeftModel.from_pretrained(model, str(paths[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(str(paths[name]), adapter_name=name)
    peft.eval()
    eos = [end_of_turn_id(tokenizer), tokenizer.eos_token_id]
    generated, started = 0, time.perf_counter()
    for name, messages in requests:
        peft.set_adapter(name)
        got, _ = _timed_generate(peft, [prompt_ids(tokenizer, messages)], pad, demo.max_tokens, eos)
        generated += got
    seconds = time.perf_counter() - started
    result = PointResult(generated / seconds, len(requests) / seconds, len(requests), generated, seconds)
    print(f"  {'seed, realistic':<22} {result.tok_s:8.1f} tok/s", flush=True)
    return result.to_json()
