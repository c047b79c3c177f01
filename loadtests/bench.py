"""`make bench`: the throughput and latency figures the issues set targets for, measured in one
run on this machine, printed as a table (and written to reports/bench.json).

Serving core: 16 concurrent requests of 32 new tokens spread over 3 adapters, through the real
HTTP service, next to (a) the seed approach (one request at a time, `PeftModel.set_adapter`) and
(b) the bare base model batched with `generate`. LoRA's cost on the same server and load: the
base model, 3 adapters mixed and 12 adapters mixed (`lora_3_over_base`, `lora_12_over_3`).
Routing: /route next to a 1-token generation of the same prompt, and `model="auto"` next to the
same request pinned to the chosen adapter, at concurrency 1 and 16; and /route over a 1-token
generation for three label sets (names with distinct first tokens, names sharing their first
tokens, 64 adapters), each on a server of its own, since a decision must cost about one prefill
whatever the adapters are called. vLLM figures join with `--engine vllm` (or `all`) when vLLM is
installed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from service.base_model import BaseModelInfo, resolve_base_model
from service.prompts import prompt_ids
from service.registration import register_adapter
from service.settings import PROJECT_ROOT, Settings

CACHE_DIR = PROJECT_ROOT / ".cache"
ADAPTERS = ("alpha", "beta", "gamma")
PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle works to a child.",
    "Describe your ideal weekend in the mountains.",
    "List some tips for learning a new language.",
]
CONCURRENCY = 16
NEW_TOKENS = 32
ROUNDS = 3
MORE_ADAPTERS = tuple(f"extra-{i}" for i in range(9))  # with ADAPTERS: the 12-adapter mix
LABEL_SETS = {
    "distinct": ADAPTERS,
    "shared": ("weather-today", "weather-week", "weather-month", "weather-alerts"),
    "many": tuple(f"expert-{i:02d}" for i in range(64)),
}


def jobs(concurrency: int = CONCURRENCY) -> list[tuple[str, str]]:
    return [(PROMPTS[i % len(PROMPTS)], ADAPTERS[i % len(ADAPTERS)]) for i in range(concurrency)]


def chat_ids(tokenizer: Any, prompt: str) -> list[int]:
    return prompt_ids(tokenizer, [{"role": "user", "content": prompt}])


def make_adapters(base: BaseModelInfo, root: Path) -> dict[str, Path]:
    from loadtests.harness import make_lora_adapter

    paths = {name: make_lora_adapter(base, root / name, seed=i + 1, scale=0.5)
             for i, name in enumerate((*ADAPTERS, *MORE_ADAPTERS))}
    paths["router"] = make_lora_adapter(base, root / "router", seed=99, scale=3.0)
    return paths


def reference_figures(base: BaseModelInfo, paths: dict[str, Path]) -> dict[str, float]:
    """(a) the seed approach and (b) the base model batched, in this process."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base.path)
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32).eval()
    pad = tokenizer.pad_token_id or tokenizer.eos_token_id
    work = jobs()
    with torch.inference_mode():
        ids = [chat_ids(tokenizer, p) for p, _ in work]
        width = max(map(len, ids))
        batch = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
        model.generate(batch[:2], attention_mask=mask[:2], max_new_tokens=2, do_sample=False)  # warm-up
        started = time.perf_counter()
        out = model.generate(batch, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=pad)
        base_tps = (out.shape[1] - width) * len(work) / (time.perf_counter() - started)

        peft = PeftModel.from_pretrained(model, str(paths[ADAPTERS[0]]), adapter_name=ADAPTERS[0])
        for name in ADAPTERS[1:]:
            peft.load_adapter(str(paths[name]), adapter_name=name)
        peft.eval()
        generated = 0
        started = time.perf_counter()
        for (_, name), prompt_ids in zip(work, ids, strict=True):
            peft.set_adapter(name)
            out = peft.generate(input_ids=torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS,
                                min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad)
            generated += out.shape[1] - len(prompt_ids)
        seed_tps = generated / (time.perf_counter() - started)
    return {"base_batched_tok_s": base_tps, "seed_sequential_tok_s": seed_tps}


async def service_throughput(url: str) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def one(prompt: str, adapter: str) -> int:
            r = await client.post("/generate", json={"prompt": prompt, "adapter": adapter, "max_tokens": NEW_TOKENS})
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        await one(PROMPTS[0], ADAPTERS[0])  # warm-up
        started = time.perf_counter()
        tokens = await asyncio.gather(*[one(p, a) for p, a in jobs()])
        return sum(tokens) / (time.perf_counter() - started)


async def chat_throughput(url: str, models: list[str], rounds: int = ROUNDS, new_tokens: int = NEW_TOKENS,
                          concurrency: int = CONCURRENCY, exact: bool = False) -> float:
    """Tokens/s of `concurrency` requests at once through /v1/chat/completions (16 of 32 new tokens
    by default), request i on models[i % n]; the best of `rounds` after one warm-up request per
    model. `exact`: every answer runs to `new_tokens` (`ignore_eos`), for comparing lengths."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def one(prompt: str, model: str) -> int:
            r = await client.post("/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": new_tokens, "temperature": 0, **({"ignore_eos": True} if exact else {}),
            })
            r.raise_for_status()
            return int(r.json()["usage"]["completion_tokens"])

        for model in dict.fromkeys(models):
            await one("Hello", model)
        best = 0.0
        for _ in range(rounds):
            started = time.perf_counter()
            tokens = await asyncio.gather(*[one(p, models[i % len(models)])
                                            for i, (p, _) in enumerate(jobs(concurrency))])
            best = max(best, sum(tokens) / (time.perf_counter() - started))
        return best


async def route_over_generation(client: httpx.AsyncClient, rounds: int) -> tuple[list[float], list[float]]:
    """/route and a 1-token generation with the chosen adapter, for the same prompts, in turn."""
    route_ms, gen1_ms = [], []
    for i in range(rounds + 1):
        prompt = PROMPTS[i % len(PROMPTS)]
        started = time.perf_counter()
        r = await client.post("/route", json={"prompt": prompt})
        r.raise_for_status()
        routed = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        g = await client.post("/generate", json={"prompt": prompt, "adapter": r.json()["adapter"], "max_tokens": 1})
        g.raise_for_status()
        if i:  # the first round warms the router's prefix cache and the adapters up
            route_ms.append(routed)
            gen1_ms.append((time.perf_counter() - started) * 1000)
    return route_ms, gen1_ms


def label_set_latency(base: BaseModelInfo, root: Path, engine: str, rounds: int = 12) -> dict[str, float]:
    """/route over a 1-token generation for each of LABEL_SETS (the same three adapter folders
    registered under every name), one server per set."""
    from loadtests.harness import ServerProcess

    out: dict[str, float] = {}
    for label_set, names in LABEL_SETS.items():
        registry = root / f"loras-{engine}-{label_set}.json"
        settings = Settings(registry=registry, adapter_root=root, cache_dir=CACHE_DIR)
        for i, name in enumerate(names):
            register_adapter(settings, base, "task", name, root / ADAPTERS[i % len(ADAPTERS)])
        register_adapter(settings, base, "router", "router", root / "router", labels=names)
        env = {"LORAMUX_REGISTRY": str(registry), "LORAMUX_ADAPTER_ROOT": str(root),
               "LORAMUX_CACHE_DIR": str(CACHE_DIR), "LORAMUX_ENGINE": engine,
               "LORAMUX_MAX_LORAS": str(len(names) + 2)}
        server = ServerProcess(env, startup_timeout=900).start(root / f"server-{engine}-{label_set}.log")
        try:
            async def measure(url: str = server.url) -> tuple[list[float], list[float]]:
                async with httpx.AsyncClient(base_url=url, timeout=600) as client:
                    return await route_over_generation(client, rounds)

            route_ms, gen1_ms = asyncio.run(measure())
        finally:
            server.stop()
        out[f"route_ms_p50_{label_set}"] = statistics.median(route_ms)
        out[f"gen_1token_ms_p50_{label_set}"] = statistics.median(gen1_ms)
        out[f"route_over_1token_{label_set}"] = out[f"route_ms_p50_{label_set}"] / out[f"gen_1token_ms_p50_{label_set}"]
    return out


async def routing_latency(url: str, rounds: int = 8) -> dict[str, float]:
    """Medians: /route vs a 1-token generation; auto vs pinned end to end at concurrency 1 and 16."""
    out: dict[str, float] = {}
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def timed(path: str, body: dict) -> tuple[float, dict]:
            started = time.perf_counter()
            r = await client.post(path, json=body)
            r.raise_for_status()
            return (time.perf_counter() - started) * 1000, r.json()

        route_ms, gen1_ms = await route_over_generation(client, rounds)
        out["route_ms_p50"] = statistics.median(route_ms)
        out["gen_1token_ms_p50"] = statistics.median(gen1_ms)
        for concurrency in (1, 16):
            auto_ms, pinned_ms = [], []
            for i in range(max(1, rounds // 2)):
                prompts = [PROMPTS[(i + k) % len(PROMPTS)] for k in range(concurrency)]

                def chat(prompt: str, model: str) -> dict:
                    return {"model": model, "messages": [{"role": "user", "content": prompt}],
                            "max_tokens": 16, "temperature": 0}

                auto = await asyncio.gather(*[timed("/v1/chat/completions", chat(p, "auto")) for p in prompts])
                auto_ms.extend(ms for ms, _ in auto)
                pinned = await asyncio.gather(*[timed("/v1/chat/completions", chat(p, body["model"]))
                                                for p, (_, body) in zip(prompts, auto, strict=True)])
                pinned_ms.extend(ms for ms, _ in pinned)
            out[f"auto_ms_p50_c{concurrency}"] = statistics.median(auto_ms)
            out[f"pinned_ms_p50_c{concurrency}"] = statistics.median(pinned_ms)
    return out


def serve_and_measure(base: BaseModelInfo, root: Path, engine: str) -> dict[str, float]:
    from loadtests.harness import ServerProcess

    registry = root / f"loras-{engine}.json"
    settings = Settings(registry=registry, adapter_root=root, cache_dir=CACHE_DIR)
    for name in (*ADAPTERS, *MORE_ADAPTERS):
        register_adapter(settings, base, "task", name, root / name)
    register_adapter(settings, base, "router", "router", root / "router", labels=ADAPTERS)
    env = {"LORAMUX_REGISTRY": str(registry), "LORAMUX_ADAPTER_ROOT": str(root),
           "LORAMUX_CACHE_DIR": str(CACHE_DIR), "LORAMUX_ENGINE": engine}  # vLLM sizes its rank cap itself
    server = ServerProcess(env, startup_timeout=600).start(root / f"server-{engine}.log")
    try:
        figures = {"service_tok_s": asyncio.run(service_throughput(server.url))}
        # the same engine and load (16 x 32 tokens, chat) on the base model, 3 adapters and 12 adapters mixed
        figures["chat_base_tok_s"] = asyncio.run(chat_throughput(server.url, [base.name]))
        figures["chat_3_adapters_tok_s"] = asyncio.run(chat_throughput(server.url, list(ADAPTERS)))
        figures["chat_12_adapters_tok_s"] = asyncio.run(chat_throughput(server.url, [*ADAPTERS, *MORE_ADAPTERS]))
        figures["lora_3_over_base"] = figures["chat_3_adapters_tok_s"] / figures["chat_base_tok_s"]
        figures["lora_12_over_3"] = figures["chat_12_adapters_tok_s"] / figures["chat_3_adapters_tok_s"]
        # per-token cost against length and load: 256 new tokens over 32 (every answer its full length), 64
        # requests at once over 16
        exact_32 = asyncio.run(chat_throughput(server.url, list(ADAPTERS), rounds=1, exact=True))
        exact_256 = asyncio.run(chat_throughput(server.url, list(ADAPTERS), rounds=1, new_tokens=256, exact=True))
        figures["tok_s_256_over_32"] = exact_256 / exact_32
        figures["chat_3_adapters_c64_tok_s"] = asyncio.run(chat_throughput(server.url, list(ADAPTERS), rounds=1,
                                                                           concurrency=64))
        figures.update(asyncio.run(routing_latency(server.url)))
        return figures
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["hf", "vllm", "all"], default="hf")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "reports" / "bench.json")
    args = parser.parse_args()
    base = resolve_base_model("smollm2", CACHE_DIR)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="loramux-bench-") as tmp:
        root = Path(tmp)
        paths = make_adapters(base, root)
        refs = reference_figures(base, paths)
        engines = ["hf", "vllm"] if args.engine == "all" else [args.engine]
        for engine in engines:
            figures = serve_and_measure(base, root, engine)
            figures.update(label_set_latency(base, root, engine))
            figures.update(refs)
            figures["service_over_seed"] = figures["service_tok_s"] / refs["seed_sequential_tok_s"]
            figures["service_over_base_batched"] = figures["service_tok_s"] / refs["base_batched_tok_s"]
            figures["route_over_1token"] = figures["route_ms_p50"] / figures["gen_1token_ms_p50"]
            for c in (1, 16):
                figures[f"auto_over_pinned_c{c}"] = figures[f"auto_ms_p50_c{c}"] / figures[f"pinned_ms_p50_c{c}"]
            results[engine] = figures
        if args.engine in ("vllm", "all"):
            try:
                from loadtests.bench_vllm import vllm_figures
            except ImportError as exc:
                print(f"vLLM comparison skipped: {exc}")
            else:
                results["vllm_reference"] = vllm_figures(base, root, {n: root / n for n in ADAPTERS})
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {args.out}")


TARGETS = {
    "service_over_seed": ">= 5",
    "service_over_base_batched": ">= 0.6",
    "route_over_1token": "<= 1.2",
    **{f"route_over_1token_{label_set}": "<= 1.2" for label_set in LABEL_SETS},
    "auto_over_pinned_c1": "<= 1.15",
    "lora_3_over_base": ">= 0.9",
    "lora_12_over_3": ">= 0.9",
    "tok_s_256_over_32": ">= 0.9",
}


def print_table(results: dict[str, dict[str, float]]) -> None:
    for section, figures in results.items():
        print(f"\n== {section} ==")
        print(f"{'figure':<32}{'value':>12}  target")
        for key, value in figures.items():
            print(f"{key:<32}{value:>12.2f}  {TARGETS.get(key, '')}")


if __name__ == "__main__":
    main()
