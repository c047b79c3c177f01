"""Config fields are type-checked, anything but plain LoRA is refused with its reason, no file can
make validation raise anything but a 422, a regex target cannot hang it, and one name rule holds
for registration and the dataset build."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from service import adapter_validation
from service.adapter_validation import base_modules, validate_adapter
from service.errors import AdapterValidationError
from service.names import check_name, is_valid_name
from service.registration import register_adapter
from service.settings import Settings
from tests.conftest import CACHE_DIR
from tests.support import PROJECT_ROOT


@pytest.fixture(scope="module")
def modules(base_model):
    return base_modules(base_model)


@pytest.fixture()
def root(tmp_path: Path, task_adapters) -> Path:
    root = tmp_path / "root"
    shutil.copytree(task_adapters["alpha"], root / "good")
    return root


def check(root: Path, base_model, modules, path: str = "good"):
    return validate_adapter(path, root, base_model, 64, modules)


def edit(folder: Path, **changes) -> None:
    file = folder / "adapter_config.json"
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))


def rewrite_weights(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    file = folder / "adapter_model.safetensors"
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file))


def first_a(tensors: dict) -> str:
    return next(k for k in sorted(tensors) if ".lora_A." in k)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"lora_alpha": None}, "lora_alpha None is not a positive number"),
        ({"lora_alpha": "16"}, "lora_alpha '16' is not a positive number"),
        ({"lora_alpha": float("nan")}, "lora_alpha nan"),
        ({"lora_alpha": 0}, "lora_alpha 0"),
        ({"r": True}, "rank True is not a positive integer"),
        ({"r": 8.0}, "rank 8.0 is not a positive integer"),
        ({"r": None}, "rank None"),
        ({"lora_dropout": 2}, "lora_dropout 2"),
        ({"target_modules": []}, "target_modules must be"),
        ({"target_modules": ["q_proj", 3]}, "target_modules must be"),
        ({"target_modules": None}, "target_modules must be"),
        ({"target_modules": {"q_proj": 1}}, "target_modules must be"),
        ({"peft_type": None}, "peft_type is missing"),
        ({"peft_type": ["LORA"]}, "only LORA"),
        ({"use_dora": True}, "DoRA"),
        ({"use_dora": "yes"}, "use_dora 'yes' is not true or false"),
        ({"use_rslora": 1}, "use_rslora 1 is not true or false"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"rank_pattern": {"q_proj": 4}}, "rank_pattern"),
        ({"alpha_pattern": {"q_proj": 4}}, "alpha_pattern"),
        ({"bias": "all"}, "bias 'all' is not served"),
        ({"lora_bias": True}, "lora_bias"),
        ({"layer_replication": [[0, 2]]}, "layer_replication"),
        ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
        ({"target_parameters": ["mlp.experts.gate_up_proj"]}, "target_parameters"),
        ({"init_lora_weights": "pissa"}, "rewrites the base model"),
        ({"init_lora_weights": 3}, "init_lora_weights 3"),
        ({"layers_to_transform": ["0"]}, "layers_to_transform"),
        ({"layers_to_transform": [-1]}, "layers_to_transform"),
        ({"exclude_modules": 5}, "exclude_modules"),
        ({"base_model_name_or_path": {"x": 1}}, "an unknown base model"),
    ],
)
def test_config_fields_are_type_checked_and_variants_refused(root, base_model, modules, changes, reason):
    edit(root / "good", **changes)
    with pytest.raises(AdapterValidationError, match=reason.replace("(", r"\(").replace("[", r"\[")) as info:
        check(root, base_model, modules)
    assert info.value.param == "path"


@pytest.mark.parametrize(
    "changes",
    [
        {"use_rslora": True},
        {"lora_alpha": 16.5},
        {"layers_to_transform": [0, 1], "layers_pattern": "layers"},
        {"init_lora_weights": "gaussian"},
        {"modules_to_save": None, "rank_pattern": {}, "alpha_pattern": None, "use_dora": False},
        {"target_modules": r".*\.(q_proj|v_proj)"},
        {"target_modules": r"^(?!.*mlp).*(?:q_proj|v_proj)$"},
        {"exclude_modules": ["k_proj"]},
    ],
)
def test_plain_lora_variants_that_are_served_pass(root, base_model, modules, changes):
    edit(root / "good", **changes)
    assert check(root, base_model, modules).rank == 8


def test_lora_alpha_absent_is_peft_default(root, base_model, modules):
    config = json.loads((root / "good" / "adapter_config.json").read_text())
    del config["lora_alpha"]
    (root / "good" / "adapter_config.json").write_text(json.dumps(config))
    assert check(root, base_model, modules).alpha == 8.0


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda t: t.__setitem__(first_a(t), t[first_a(t)].new_tensor(1.0).reshape(())), "has shape"),
        (lambda t: t.__setitem__(first_a(t), t[first_a(t)].unsqueeze(0)), "has shape"),
        (lambda t: t.__setitem__(first_a(t), t[first_a(t)][:, :0].contiguous()), "has shape"),
        (lambda t: t.__setitem__(first_a(t), t[first_a(t)].to(dtype=__import__("torch").int32)), "dtype"),
        (lambda t: t.__setitem__(first_a(t).replace(".lora_A.weight", ".lora_magnitude_vector"),
                                 t[first_a(t)][0].clone()), "not LoRA A/B matrices"),
        (lambda t: t.__setitem__("base_model.model.lm_head.weight", t[first_a(t)].clone()), "not LoRA A/B"),
        (lambda t: t.pop(first_a(t).replace("lora_A", "lora_B")), "not both"),
        (lambda t: t.__setitem__(first_a(t).replace("q_proj", "k_proj"), t[first_a(t)].clone()),
         "target_modules does not name"),
        (lambda t: [t.pop(k) for k in list(t)], "holds no LoRA weights"),
    ],
    ids=["0-d", "3-d", "empty", "int32", "dora-magnitude", "full-weight", "unpaired", "untargeted", "no-tensors"],
)
def test_weights_that_are_not_plain_lora_matrices_are_refused(root, base_model, modules, change, reason):
    rewrite_weights(root / "good", change)
    with pytest.raises(AdapterValidationError, match=reason):
        check(root, base_model, modules)


def test_an_unexpected_error_while_validating_is_a_422(root, base_model, modules, monkeypatch):
    def unreadable(path, chunk=0):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(adapter_validation, "sha256_file", unreadable)
    with pytest.raises(AdapterValidationError, match="not readable: Permission denied") as info:
        check(root, base_model, modules)
    assert str(root) not in info.value.message  # no absolute path in what a client reads

    def broken(path, chunk=0):
        raise ZeroDivisionError("surprise")

    monkeypatch.setattr(adapter_validation, "sha256_file", broken)
    with pytest.raises(AdapterValidationError, match=r"could not be validated \(ZeroDivisionError\)"):
        check(root, base_model, modules)


def test_config_that_is_huge_or_too_deep_is_refused(root, base_model, modules):
    (root / "good" / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(AdapterValidationError, match="not valid JSON"):
        check(root, base_model, modules)
    (root / "good" / "adapter_config.json").write_text(json.dumps({"pad": "x" * (2 << 20)}))
    with pytest.raises(AdapterValidationError, match="larger than"):
        check(root, base_model, modules)


# ---- regex target_modules ----------------------------------------------------------------------
VALIDATE_IN_CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from service.adapter_validation import BaseModules, validate_adapter
    from service.base_model import BaseModelInfo
    from service.errors import AdapterValidationError
    base = BaseModelInfo(**json.loads(sys.argv[2]))
    try:
        names = frozenset(json.loads(Path(sys.argv[3]).read_text()))
        validate_adapter("good", Path(sys.argv[1]), base, 64, BaseModules(names, {}))
        print("ACCEPTED")
    except AdapterValidationError as exc:
        print("REFUSED", exc.message)
""")


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        (r"(.*)*x", "nests a repeat inside a repeat"),  # exponential: hangs `re` for minutes
        (r"(?:[a-z_.0-9]+)+x", "nests a repeat inside a repeat"),
        (r"(.)\1*q_proj", "backreference"),
        (r".*" * 14 + "x", "takes too long"),  # polynomial, no nesting: only the time budget stops it
        ("q_proj|" * 60 + "v_proj", "at most 256"),
        (r"[", "is invalid"),
    ],
    ids=["nested-star", "nested-plus", "backref", "sequential-stars", "too-long", "invalid"],
)
def test_a_regex_target_cannot_hang_validation(root, base_model, modules, tmp_path, pattern, reason):
    """Run in a child process so that, on code without the checks, the hang is a timeout here
    rather than a frozen test run (a regex holds the GIL: no thread could interrupt it)."""
    edit(root / "good", target_modules=pattern)
    names = tmp_path / "modules.json"
    names.write_text(json.dumps(sorted(modules.names)))
    base = json.dumps({"name": base_model.name, "path": str(base_model.path), "sha256": base_model.sha256})
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-c", VALIDATE_IN_CHILD, str(root), base, str(names)],
                              capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"validating target_modules={pattern!r} did not finish in 60 s")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("REFUSED") and reason in done.stdout, done.stdout
    assert time.monotonic() - started < 45


# ---- names ---------------------------------------------------------------------------------------
BAD_NAMES = ["ünï", "日本語", "naïve", "a b", "a\nb", "a\r\nX-Evil: 1", "-lead", "_lead", "a.b", "a/b", "",
             "a" * 65, "auto", "base", "Auto", "BASE", "tab\t", "name\u200b", "ａｌｐｈａ"]
GOOD_NAMES = ["a", "alpha", "A-1_b", "0day", "a" * 64, "router", "auto-2", "base_model"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_one_ascii_name_rule_refuses(name):
    assert not is_valid_name(name)
    with pytest.raises(AdapterValidationError, match="must be letters") as info:
        check_name(name)
    assert info.value.param == "name"


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_one_ascii_name_rule_accepts(name):
    assert is_valid_name(name) and check_name(name) == name


@pytest.mark.parametrize("name", ["ünï", "日本語", "Auto", "a" * 65])
def test_registration_and_dataset_build_use_the_rule(root, base_model, modules, tmp_path, name):
    from training.data.chats import DatasetError
    from training.data.routing_dataset import check_adapter_name, parse_source_args

    settings = Settings(registry=tmp_path / "loras.json", adapter_root=root, cache_dir=CACHE_DIR)
    with pytest.raises(AdapterValidationError, match="must be letters") as info:
        register_adapter(settings, base_model, "task", name, "good", modules=modules)
    assert info.value.param == "name" and not settings.registry.exists()
    with pytest.raises(DatasetError, match="must be letters"):
        check_adapter_name(name)
    with pytest.raises(DatasetError, match="must be letters"):
        parse_source_args([f"{name}=x.jsonl"])
    register_adapter(settings, base_model, "task", "fine-name_1", "good", modules=modules)


def test_a_router_label_follows_the_rule_too(root, base_model, modules, tmp_path):
    settings = Settings(registry=tmp_path / "loras.json", adapter_root=root, cache_dir=CACHE_DIR)
    with pytest.raises(AdapterValidationError, match="must be letters") as info:
        register_adapter(settings, base_model, "router", "router", "good", labels=("alpha", "ünï"),
                         modules=modules)
    assert info.value.param == "labels"
