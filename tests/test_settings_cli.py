"""Settings from the environment, insecure combinations refused, and one CLI flag per setting."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from service.settings import Settings


def test_env_prefix_and_comma_lists(monkeypatch):
    monkeypatch.setenv("LORAMUX_API_KEYS", "k1, k2")
    monkeypatch.setenv("LORAMUX_MAX_QUEUE", "7")
    settings = Settings()
    assert settings.api_keys == ["k1", "k2"]
    assert settings.max_queue == 7
    assert settings.auth_enabled


def test_public_bind_without_keys_is_refused():
    with pytest.raises(ValidationError, match="without LORAMUX_API_KEYS"):
        Settings(host="0.0.0.0")
    assert Settings(host="0.0.0.0", api_keys=["k"]).host == "0.0.0.0"
    assert Settings(host="0.0.0.0", allow_insecure=True).allow_insecure


def test_every_setting_is_a_serve_flag():
    out = subprocess.run([sys.executable, "-m", "loramux", "serve", "--help"], capture_output=True, text=True,
                         env={"COLUMNS": "250", "PATH": ""}, check=True).stdout
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in out, name


def test_serve_refuses_insecure_flags():
    proc = subprocess.run([sys.executable, "-m", "loramux", "serve", "--host", "0.0.0.0"],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "without LORAMUX_API_KEYS" in proc.stderr + proc.stdout
