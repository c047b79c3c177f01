"""Deployment: the Modal app (`modal_app/`), the registry's cross-container write lock (`volume_writes.py`),
an image's pins from pyproject.toml (`requirements.py`) and the container entrypoint; the images' Dockerfile
is at the repository root."""
