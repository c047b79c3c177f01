"""The layers of the tree hold (issue 14): the service runs without the training package, the request
path and the engines know nothing of HTTP, engines raise their own errors and name no API field, and
benchmarks need no test helpers. Each is read off the code itself, so a new import that breaks a layer fails here."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from service.settings import PROJECT_ROOT


def imports_of(path: Path) -> set[str]:
    """Top-level module names of every import in a file, at any depth (lazy imports count too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def files(folder: str) -> list[Path]:
    return sorted((PROJECT_ROOT / folder).rglob("*.py"))


def test_the_service_imports_without_the_training_package() -> None:
    """Every service module imports with `training` and `peft` (the training extra's) made unimportable:
    a serving-only install works."""
    script = (
        "import importlib, pkgutil, sys\n"
        "sys.modules['training'] = None\n"  # any `import training...` now raises ImportError
        "sys.modules['peft'] = None\n"
        "import service\n"
        "for m in pkgutil.walk_packages(service.__path__, 'service.'):\n"
        "    importlib.import_module(m.name)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not any(name.split(".")[0] == "training" for f in files("service") for name in imports_of(f))


def test_the_request_path_and_the_engines_know_nothing_of_http() -> None:
    web = {"starlette", "fastapi", "uvicorn", "h11"}
    for path in [PROJECT_ROOT / "service" / "inference.py", *files("service/engine"), *files("service/routing")]:
        found = {n for n in imports_of(path) if n.split(".")[0] in web}
        assert not found, (path.relative_to(PROJECT_ROOT), found)


def test_engines_name_no_api_field() -> None:
    """An engine's refusal carries no `param`: the request path names the field the input came from."""
    for path in files("service/engine"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                assert not any(k.arg == "param" for k in node.keywords), (path.name, node.lineno)


def test_engines_raise_engine_errors() -> None:
    """Engines report in their own terms (`service.engine.errors`, no HTTP status); the request path
    maps them to the service's errors (`errors.from_engine`). The shared context rule too: engines take
    its wording (`overflow`), not the service's refusal (`ensure_fits`, `ContextLengthError`)."""
    for path in files("service/engine"):
        assert "service.errors" not in imports_of(path), path.name
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "service.context_window":
                assert not {a.name for a in node.names} & {"ensure_fits", "ContextLengthError"}, path.name


def test_benchmarks_do_not_import_test_helpers() -> None:
    for path in files("loadtests"):
        found = {n for n in imports_of(path) if n.split(".")[0] == "tests"}
        assert not found, (path.relative_to(PROJECT_ROOT), found)
