"""Every way an adapter folder can be unusable is refused before a weight is loaded."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from service.adapter_validation import base_modules, validate_adapter
from service.errors import AdapterValidationError


@pytest.fixture(scope="module")
def modules(base_model):
    return base_modules(base_model)


@pytest.fixture()
def root(tmp_path: Path, task_adapters) -> Path:
    root = tmp_path / "root"
    shutil.copytree(task_adapters["alpha"], root / "good")
    return root


def check(root: Path, path, base_model, modules, max_rank: int = 64):
    return validate_adapter(path, root, base_model, max_rank, modules)


def test_good_adapter_passes_and_final_is_detected(root, base_model, modules):
    info = check(root, "good", base_model, modules)
    assert info.rank == 8 and set(info.target_modules) == {"q_proj", "v_proj"}
    shutil.copytree(root / "good", root / "run" / "final")
    assert check(root, "run", base_model, modules).path == (root / "run" / "final").resolve()


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10), "safetensors"),
        (lambda d: _edit(d, base_model_name_or_path="someone/else"), "trained on"),
        (lambda d: _edit(d, peft_type="IA3"), "only LORA"),
        (lambda d: _edit(d, target_modules=["no_such_proj"]), "do not exist"),
        (lambda d: (d / "adapter_model.safetensors").unlink(), "missing"),
        (lambda d: (d / "adapter_config.json").unlink(), "missing"),
        (lambda d: (d / "adapter_model.safetensors").rename(d / "adapter_model.bin"), "pickle"),
    ],
)
def test_broken_adapters_are_refused(root, base_model, modules, mutate, reason):
    mutate(root / "good")
    with pytest.raises(AdapterValidationError, match=reason):
        check(root, "good", base_model, modules)


Q_PROJ = "model.layers.0.self_attn.q_proj"


def _cut(folder: Path, which: str, rows: slice, cols: slice) -> None:
    from safetensors.torch import load_file, save_file

    file = folder / "adapter_model.safetensors"
    tensors = load_file(str(file))
    save_file({k: (v[rows, cols].contiguous() if f"lora_{which}" in k else v) for k, v in tensors.items()}, str(file))


@pytest.mark.parametrize(
    ("which", "rows", "cols", "reason"),
    [
        ("A", slice(None), slice(0, 100), f"has shape [8, 100]; the base model's {Q_PROJ} has 576 inputs"),
        ("B", slice(0, 64), slice(None), f"has shape [64, 8]; the base model's {Q_PROJ} has 576 outputs"),
    ],
)
def test_a_matrix_the_base_model_cannot_take_is_refused_before_loading(root, base_model, modules, which, rows, cols,
                                                                       reason):
    """Widths are read from the safetensors header against the base model's layers: a wrong one is a
    422 naming the layer, never a failed load inside the engine."""
    _cut(root / "good", which, rows, cols)
    with pytest.raises(AdapterValidationError, match=re.escape(reason)):
        check(root, "good", base_model, modules)


def test_rank_above_maximum(root, base_model, modules):
    with pytest.raises(AdapterValidationError, match="exceeds the maximum 4"):
        check(root, "good", base_model, modules, max_rank=4)


def test_paths_leaving_the_root(root, tmp_path, base_model, modules, task_adapters):
    with pytest.raises(AdapterValidationError, match=r"'\.\.'"):
        check(root, "../good", base_model, modules)
    with pytest.raises(AdapterValidationError, match="outside the adapter root"):
        check(root, str(task_adapters["beta"]), base_model, modules)  # absolute, elsewhere
    (root / "link").symlink_to(task_adapters["beta"])
    with pytest.raises(AdapterValidationError, match="outside the adapter root"):
        check(root, "link", base_model, modules)
    (root / "sneaky").mkdir()
    (root / "sneaky" / "adapter_config.json").symlink_to(task_adapters["beta"] / "adapter_config.json")
    shutil.copy(task_adapters["beta"] / "adapter_model.safetensors", root / "sneaky")
    with pytest.raises(AdapterValidationError, match="leaving the adapter root"):
        check(root, "sneaky", base_model, modules)
    assert check(root, str(root / "good"), base_model, modules).rank == 8  # absolute inside is fine


def _edit(folder: Path, **changes) -> None:
    file = folder / "adapter_config.json"
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))
