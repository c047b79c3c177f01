"""Deployment: the Modal app (`modal_app.py`) and the container image (`Dockerfile`)."""
