"""The packaged GGUF becomes a cached safetensors folder once; local folders work as base models."""

from __future__ import annotations

import json
import time

from service.base_model import MANIFEST, PACKAGED_NAME, packaged_gguf_path, resolve_base_model, sha256_file
from tests.conftest import CACHE_DIR


def test_conversion_is_cached_with_checksums(base_model):
    manifest = json.loads((base_model.path / MANIFEST).read_text())
    assert manifest["source_sha256"] == sha256_file(packaged_gguf_path())
    assert manifest["weights_sha256"] == base_model.sha256 and len(base_model.sha256) == 64
    assert (base_model.path / "model.safetensors").is_file()
    assert "im_start" in (base_model.path / "chat_template.jinja").read_text()
    started = time.perf_counter()
    again = resolve_base_model("smollm2", CACHE_DIR)
    assert again == base_model and time.perf_counter() - started < 5  # no second conversion


def test_local_folder_is_a_base_model(base_model, tmp_path):
    local = resolve_base_model(str(base_model.path), tmp_path)
    assert local.name == PACKAGED_NAME and local.path == base_model.path.resolve()
    assert local.sha256 == base_model.sha256
    named = resolve_base_model(str(base_model.path), tmp_path, name="my-base")
    assert named.name == "my-base"
