"""The two container images of the Modal app: serving (vLLM) and training (vLLM + the training extra).

Why two: the service never trains, so its image carries no TRL, datasets or scikit-learn (a smaller
image, a faster cold start, less to patch); the training functions need both, because they evaluate
through the serving engine. Both start from the same CUDA *devel* image as the Dockerfile's `gpu` stage
(`CUDA_BASE_IMAGE`, pinned by digest): vLLM JIT-compiles some kernels (FlashInfer) at start, which needs
the CUDA toolkit. Both install the dependencies first (pins from `pyproject.toml` through
`deploy/requirements.py`), then the project's source with `--no-deps`, so a source change rebuilds
only the last layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import modal

from deploy.requirements import requirements

# The Dockerfile's `CUDA_IMAGE` argument holds the same reference (tests/test_deploy.py checks they agree).
CUDA_BASE_IMAGE = (
    "nvidia/cuda:12.8.1-devel-ubuntu22.04@sha256:6617a625f4090c76c545a0e7d63f2e441718ef9af7f4efe7dd1242a29e289fd7"
)
PYTHON_VERSION = "3.11"  # the project's version
SERVING_EXTRAS = ("vllm",)
TRAINING_EXTRAS = ("vllm", "train")

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # only read on the deploying machine (image build)
PROJECT_IN_IMAGE = "/root/loramux"


def pins(extras: Sequence[str]) -> list[str]:
    """The image's pinned requirements. Read on the deploying machine only: a container never builds its
    image, and has no pyproject to read."""
    return requirements(PROJECT_ROOT / "pyproject.toml", extras) if modal.is_local() else []


def project_image(extras: Sequence[str]) -> modal.Image:
    """CUDA devel + Python, the dependency layer, then the project installed from its source."""
    ignore = ["**/__pycache__"]
    return (
        modal.Image.from_registry(CUDA_BASE_IMAGE, add_python=PYTHON_VERSION)
        .entrypoint([])  # the CUDA image's entrypoint prints a banner and would wrap Modal's
        .pip_install(*pins(extras))  # rebuilt only when a pin changes
        .add_local_file(PROJECT_ROOT / "pyproject.toml", f"{PROJECT_IN_IMAGE}/pyproject.toml", copy=True)
        .add_local_file(PROJECT_ROOT / "README.md", f"{PROJECT_IN_IMAGE}/README.md", copy=True)
        .add_local_dir(PROJECT_ROOT / "service", f"{PROJECT_IN_IMAGE}/service", copy=True, ignore=ignore)
        .add_local_dir(PROJECT_ROOT / "training", f"{PROJECT_IN_IMAGE}/training", copy=True, ignore=ignore)
        .run_commands(f"python -m pip install --no-deps {PROJECT_IN_IMAGE}")  # `loramux` on PATH, no resolving
    )


serving_image = project_image(SERVING_EXTRAS)
training_image = project_image(TRAINING_EXTRAS)
