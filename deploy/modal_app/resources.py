"""The named Modal objects the app uses: three Volumes, the registry's lock, two secrets.

Why three volumes: the base model cache (written once, read by every container), the adapters
(training runs, datasets, reports; pushed with `modal volume put`), and the registry on its own, so a
registration is one small file that every serving replica reloads without touching the weights. Every
replica mounts the same three, so every replica sees the same registry (how changes reach them:
`volume_sync.py`). Everything is looked up by name at deploy time (`create_if_missing`), so the
containers reach the same objects.
"""

from __future__ import annotations

import os

import modal

from deploy.modal_app.config import ADAPTERS_DIR, CONFIG, MODELS_DIR, REGISTRY_DIR

models_volume = modal.Volume.from_name(CONFIG.models_volume, create_if_missing=True)
adapters_volume = modal.Volume.from_name(CONFIG.adapters_volume, create_if_missing=True)
registry_volume = modal.Volume.from_name(CONFIG.registry_volume, create_if_missing=True)
registry_locks = modal.Dict.from_name(CONFIG.registry_lock, create_if_missing=True)
VOLUMES: dict[str | os.PathLike[str], modal.Volume] = {
    MODELS_DIR: models_volume,
    ADAPTERS_DIR: adapters_volume,
    REGISTRY_DIR: registry_volume,
}

api_keys_secret = modal.Secret.from_name(CONFIG.api_keys_secret, required_keys=["LORAMUX_API_KEYS"])
# HF_TOKEN goes only to the containers that may download the base model (see `server.py`, `training.py`)
hf_secret = modal.Secret.from_name(CONFIG.hf_secret)
