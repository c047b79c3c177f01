"""Real training on the real base model: a few steps, a loadable adapter, the serving path.

Kept small (tiny datasets, rank 4, 2-3 steps of batch 4) so the whole file runs in about a minute
or two on 2 cores; what it checks is the machinery (files, metadata, validation, determinism,
resume, evaluation through the engine, registration), not the quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.adapter_validation import base_modules, validate_adapter
from service.base_model import BaseModelInfo
from service.prompts import router_messages
from service.registry import Registry
from service.settings import PROJECT_ROOT, Settings
from training.data.chats import read_chats, write_jsonl
from training.data.routing_dataset import build_routing_dataset
from training.data.sources import hass
from training.train.preprocess import IGNORE, tokenize_chat, tokenize_records

TINY = {"rank": 4, "alpha": 8, "batch_size": 4, "progress": False, "eval_examples": 4, "save_steps": 1000}


@pytest.fixture(scope="module")
def tokenizer(base_model: BaseModelInfo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_model.path)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("train_root")


@pytest.fixture(scope="module")
def settings(root: Path) -> Settings:
    return Settings(adapter_root=root, registry=root / "loras.json", cache_dir=PROJECT_ROOT / ".cache")


@pytest.fixture(scope="module")
def expert_files(root: Path) -> dict[str, Path]:
    intents = hass.load_intents()
    out = {}
    for name in ("lights", "media"):
        records = hass.expert_records(hass.EXPERTS[name], 16, seed=0, intents=intents)
        out[name] = root / "data" / f"{name}.jsonl"
        write_jsonl(out[name], records)
    return out


@pytest.fixture(scope="module")
def routing_dir(root: Path, expert_files: dict[str, Path]) -> Path:
    return build_routing_dataset(expert_files, root / "data" / "routing", seed=0).path


def test_loss_only_on_the_answer(tokenizer) -> None:
    messages = [{"role": "user", "content": "switch on the desk lamp"}, {"role": "assistant", "content": "lights"}]
    item = tokenize_chat(tokenizer, router_messages(messages) + [messages[-1]])
    prompt = tokenizer.apply_chat_template(router_messages(messages), add_generation_prompt=True, tokenize=True,
                                           return_dict=False)
    assert item.input_ids[: len(prompt)] == list(prompt)
    assert item.labels[: len(prompt)] == [IGNORE] * len(prompt)
    answer = item.labels[len(prompt):]
    # the answer is the name's tokens, then the end of turn: the token Router.decide scores comes first
    assert answer == tokenizer.encode("lights", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert tokenizer.decode(answer) == "lights<|im_end|>"


def test_length_filter_reports_what_it_drops(tokenizer, expert_files: dict[str, Path]) -> None:
    records = read_chats(expert_files["lights"])
    lengths = sorted(len(tokenize_chat(tokenizer, r.messages).input_ids) for r in records)
    limit = lengths[len(lengths) // 2]
    kept, report = tokenize_records(tokenizer, records, max_length=limit)
    assert len(kept) == sum(n <= limit for n in lengths) == report.kept
    assert sum(report.dropped.values()) == len(records) - len(kept) > 0
    assert report.longest_dropped == lengths[-1] and report.longest_kept <= limit


@pytest.mark.slow
def test_train_router_validate_evaluate_register(settings: Settings, base_model: BaseModelInfo, routing_dir: Path
                                                 ) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from training.evaluate.router_and_experts import evaluate_router
    from training.register.commands import RegistryContext, register_adapter
    from training.train.sft import TrainConfig, train_adapter

    result = train_adapter(TrainConfig(kind="router", dataset=routing_dir, run_name="tiny-router", max_steps=3,
                                       **TINY), settings, base_model)
    final = result.final_dir
    assert final == settings.adapter_root / "runs" / "tiny-router" / "final"
    assert (final / "adapter_model.safetensors").is_file() and not list(final.glob("*.bin"))
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == base_model.name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    meta = json.loads((final / "loramux.json").read_text())
    assert meta["kind"] == "router" and meta["labels"] == ["lights", "media"]
    assert meta["base_model"] == {"name": base_model.name, "sha256": base_model.sha256}
    assert len(meta["dataset"]["fingerprint"]) == 64 and meta["metrics"]["steps"] == 3
    assert meta["preprocessing"]["length_filter"]["dropped"] == 0

    modules = base_modules(base_model)
    info = validate_adapter(final, settings.adapter_root, base_model, settings.max_lora_rank, modules)
    assert info.rank == 4 and info.metadata["labels"] == ["lights", "media"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model.path), str(final))
    assert any("lora_A" in name for name, _ in model.named_parameters())

    report = evaluate_router(final, routing_dir, settings, limit=4).report
    assert report["examples"] == 4 and report["labels"] == ["lights", "media"]
    assert sum(map(sum, report["confusion"]["matrix"])) == 4
    assert report["invalid_name_rate"] == 0.0  # constrained decisions are always a label
    # the ECE is the reliability table's weighted gap, and the table agrees with the accuracy and the
    # mean confidence computed from the decisions themselves
    calibration = report["calibration"]
    filled = [b for b in calibration["bins"] if b["count"]]
    assert sum(b["count"] for b in filled) == 4
    assert calibration["ece"] == pytest.approx(sum(b["count"] / 4 * abs(b["accuracy"] - b["confidence"])
                                                   for b in filled), abs=1e-9)
    assert sum(b["count"] * b["accuracy"] for b in filled) / 4 == pytest.approx(report["accuracy"], abs=1e-9)
    assert sum(b["count"] * b["confidence"] for b in filled) / 4 == pytest.approx(calibration["mean_confidence"],
                                                                                 abs=1e-9)

    version = register_adapter("router", "router", final, context=RegistryContext(settings, base_model, modules))
    snapshot = Registry(settings.registry).load()
    assert snapshot.active_router == "router" and version.labels == ("lights", "media")
    assert snapshot.entries["router"].active.path == "runs/tiny-router/final"


@pytest.mark.slow
def test_task_training_is_deterministic_and_resumable(settings: Settings, base_model: BaseModelInfo,
                                                      expert_files: dict[str, Path]) -> None:
    import shutil

    from safetensors.torch import load_file

    from training.train.sft import TrainConfig, train_adapter

    def run(name: str, steps: int, **extra: object) -> dict:
        config = TrainConfig(kind="task", dataset=expert_files["lights"], run_name=name, max_steps=steps, seed=7,
                             **{**TINY, **extra})
        return train_adapter(config, settings, base_model).metadata

    first = run("det-a", 2)
    run("det-b", 2)
    a = load_file(str(settings.adapter_root / "runs/det-a/final/adapter_model.safetensors"))
    b = load_file(str(settings.adapter_root / "runs/det-b/final/adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert first["system_prompt"] == hass.EXPERTS["lights"].system_prompt  # the service supplies it
    assert first["tools"] and set(first["tools"]) <= hass.EXPERTS["lights"].intents
    assert first["tools_in_prompt"] is False  # trained on bare requests: served without the tools' schemas

    # an interrupted run (checkpoint written, no final/) continues from its checkpoint
    run("resume", 2, save_steps=1)
    run_dir = settings.adapter_root / "runs" / "resume"
    assert (run_dir / "checkpoint-2").is_dir()
    shutil.rmtree(run_dir / "final")
    resumed = run("resume", 3, save_steps=1)
    assert resumed["metrics"]["resumed"] is True and resumed["metrics"]["steps"] == 3

    from training.train.sft import TrainError

    with pytest.raises(TrainError, match="finished"):
        run("resume", 3)
