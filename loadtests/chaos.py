"""`make chaos`: the abuse-and-fault run of issue 13. A real server on a private copy of the demo's
registry and adapters, with API and admin keys as in production, normal clients at a steady rate,
and beside them, bounded in count and time and on 127.0.0.1 only, what breaks services: over-long
prompts, image bombs, bad images, non-ASCII and reserved names, slow readers and abandoned streams,
bad adapters registered during traffic, a registry file truncated and restored, `kill -9` of a
registering CLI, and last SIGTERM during load.

    python -m loadtests.chaos                       # after `loramux demo`: config/loras.json
    python -m loadtests.chaos --registry R --adapter-root A --duration 20 --json --out chaos.json

Phases: `quiet` (normal clients alone, D seconds: the latency every other figure is compared to),
`abuse` (the same clients at the same rate, with the abuse beside them, at least D seconds), then the
in-flight gauge is read once the abuse has ended, every acknowledged registration is looked up, and
`drain` sends SIGTERM while normal requests are in flight. It prints normal requests answered 200,
their p99 under abuse over quiet, every 5xx, the in-flight gauge, acknowledged-then-missing
registrations and the time to the first correct answer after each fault; it exits 1 when one of the
issue's targets is missed (100% normal 200, p99 at most 2x quiet, 0 x 5xx, in-flight 0, 0 lost).

Each `kill -9` hits a `loramux register` started a moment after a good one, when the good one exits:
the victim is then late in its run (validating, hashing, writing), not in its imports. The registry
truncations take the registry's own file lock, so the bytes put back are the file's latest and a
registration is never undone by the fault itself. The in-flight gauge is read before the drain (the
server is gone after it), once it is 0 or `--settle-s` has passed.

The copy matters: the run registers adapters, truncates the registry file and kills the server, so
it never touches the registry it was given. The server runs torch on one thread, as the test servers
do, and on a core of its own: the normal clients, the abuse and the CLIs it runs (each imports torch
and hashes weights for seconds) keep to the other cores. On a shared pair of cores the CLIs' start-up
alone made the server's steps four times slower, and the p99 then measured the load generator, not
the service (`--share-cores` puts everything back on every core).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from filelock import FileLock

from loadtests.chaos_payloads import (
    Abuse,
    BadAdapter,
    build_bad_adapters,
    image_requests,
    name_requests,
    oversize_requests,
)
from loadtests.harness import SINGLE_THREAD, ServerProcess, crashes, start_server
from service.registry import Registry
from service.settings import PROJECT_ROOT

NORMAL_PROMPTS = (
    "turn on the kitchen lights",
    "what is on my calendar on friday?",
    "set a timer for five minutes",
    "dim the bedroom lamp to 30 percent",
    "book a meeting with Sam next tuesday at 3pm",
    "how long until my alarm goes off?",
)
ABUSE_FAMILIES = ("oversize", "images", "names", "streams", "adapters")
TARGETS = {
    "normal_200_pct": "100% of normal requests answered 200",
    "p99_ratio": "normal p99 under abuse at most {ratio:g}x the quiet run",
    "status_5xx": "0 responses 5xx (normal and abusive)",
    "in_flight_after": "in-flight gauge back to 0 after the abuse",
    "registrations_lost": "0 acknowledged registrations missing",
}


# ---- what happened ------------------------------------------------------------------------------
@dataclass
class Outcome:
    """One request: normal (must be a well-formed 200) or abusive (must get one of `expected`)."""

    kind: str  # "normal" or the abuse family
    phase: str
    label: str
    started: float
    ended: float
    status: int | None  # None: no HTTP status (connection closed, timeout)
    ok: bool
    detail: str = ""


@dataclass
class Fault:
    name: str
    at: float


@dataclass
class Registration:
    """A registration attempt; `acknowledged` is a 2xx from the admin API or exit 0 from the CLI."""

    via: str
    name: str
    acknowledged: bool
    version: int | None = None
    detail: str = ""


class Journal:
    """Every outcome, fault and registration of the run, shared by all threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.outcomes: list[Outcome] = []
        self.faults: list[Fault] = []
        self.registrations: list[Registration] = []
        self.notes: list[str] = []

    def add(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)

    def fault(self, name: str) -> None:
        with self.lock:
            self.faults.append(Fault(name, time.monotonic()))

    def registered(self, registration: Registration) -> None:
        with self.lock:
            self.registrations.append(registration)

    def note(self, text: str) -> None:
        with self.lock:
            self.notes.append(text)


def body_problem(path: str, response: httpx.Response) -> str:
    """Empty for a correct normal answer: a 200 whose body has the shape its endpoint promises."""
    if response.status_code != 200:
        return response.text[:300]
    try:
        body = response.json()
        if path == "/route":
            assert body["candidates"] and "adapter" in body
        elif path == "/generate":
            assert isinstance(body["text"], str) and body["finish_reason"] in ("stop", "length")
        else:
            assert isinstance(body["choices"][0]["message"]["content"], str)
    except (ValueError, KeyError, IndexError, TypeError, AssertionError):
        return f"malformed 200 body: {response.text[:200]}"
    return ""


# ---- normal clients -----------------------------------------------------------------------------
class NormalClients:
    """Open-loop clients: one request every 1/rate seconds whatever the answers take, so a slow
    server shows up as latency, not as a lower request rate. The mix is fixed: routed and pinned
    chat completions, routed /generate and /route, short answers."""

    def __init__(self, url: str, key: str, adapters: list[str], rate: float, journal: Journal):
        self.client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120,
                                   limits=httpx.Limits(max_connections=64, max_keepalive_connections=16))
        self.adapters, self.rate, self.journal = adapters, rate, journal
        self.pool = ThreadPoolExecutor(32, thread_name_prefix="normal")
        self.sent = 0

    def request(self, i: int, max_tokens: int = 8) -> tuple[str, str, dict[str, Any]]:
        prompt = NORMAL_PROMPTS[i % len(NORMAL_PROMPTS)]
        messages = [{"role": "user", "content": prompt}]
        adapter = self.adapters[(i // 4) % len(self.adapters)]
        kinds = [
            ("chat auto", "/v1/chat/completions", {"model": "auto", "messages": messages, "max_tokens": max_tokens}),
            ("chat pinned", "/v1/chat/completions", {"model": adapter, "messages": messages, "max_tokens": max_tokens}),
            ("route", "/route", {"prompt": prompt}),
            ("generate auto", "/generate", {"prompt": prompt, "max_tokens": max_tokens}),
        ]
        return kinds[i % len(kinds)]

    def one(self, phase: str, i: int, max_tokens: int = 8, scheduled: float | None = None) -> Outcome:
        """One normal request; its latency counts from `scheduled` (when the open loop sent it), so
        time spent waiting for a free client thread behind a stalled server is counted too."""
        label, path, payload = self.request(i, max_tokens)
        started = time.monotonic() if scheduled is None else scheduled
        try:
            response = self.client.post(path, json=payload)
            status, problem = response.status_code, body_problem(path, response)
        except httpx.HTTPError as exc:
            status, problem = None, f"{type(exc).__name__}: {exc}"
        outcome = Outcome("normal", phase, label, started, time.monotonic(), status, not problem, problem)
        self.journal.add(outcome)
        return outcome

    def run(self, phase: str, keep_going: Callable[[], bool]) -> list[Future[Outcome]]:
        """Send at the rate while `keep_going()`; returns the futures of everything sent."""
        futures: list[Future[Outcome]] = []
        next_at = time.monotonic()
        while keep_going():
            futures.append(self.pool.submit(self.one, phase, self.sent, 8, time.monotonic()))
            self.sent += 1
            next_at += 1 / self.rate
            time.sleep(max(0.0, next_at - time.monotonic()))
        return futures

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.client.close()


# ---- abuse --------------------------------------------------------------------------------------
@dataclass
class Run:
    """The server under test and what the abuse threads share."""

    server: ServerProcess
    root: Path
    registry: Path
    user_key: str
    admin_key: str
    good_adapter: Path  # a real task adapter folder inside the copy, to copy from
    adapters: list[str]
    journal: Journal
    deadline: float  # abuse threads start nothing new after this
    poll_s: float
    cli_kills: int
    cli_registrations: int
    truncations: list[float]
    workdir: Path

    def auth(self, admin: bool = False) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key if admin else self.user_key}"}

    def send(self, kind: str, abuse: Abuse, timeout: float = 120) -> Outcome:
        started = time.monotonic()
        try:
            response = httpx.request(abuse.method, f"{self.server.url}{abuse.path}", json=abuse.payload,
                                     headers=self.auth(abuse.admin), timeout=timeout)
            status, detail = response.status_code, response.text[:300]
            if abuse.payload.get("stream") and status == 200:
                detail = response.text[-300:]
        except httpx.HTTPError as exc:
            status, detail = None, f"{type(exc).__name__}: {exc}"
        ok = status in abuse.expected or (status is None and abuse.may_drop)
        outcome = Outcome(kind, "abuse", abuse.label, started, time.monotonic(), status, ok, detail)
        self.journal.add(outcome)
        return outcome

    def admin_view(self) -> dict[str, Any]:
        return httpx.get(f"{self.server.url}/admin/adapters", headers=self.auth(True), timeout=60).json()

    def cli(self) -> list[str]:
        return [sys.executable, "-m", "loramux"]

    def cli_env(self) -> dict[str, str]:
        return {**os.environ, **SINGLE_THREAD, "LORAMUX_REGISTRY": str(self.registry),
                "LORAMUX_ADAPTER_ROOT": str(self.root), "LORAMUX_CACHE_DIR": str(PROJECT_ROOT / ".cache")}


def spread(run: Run, steps: list[Callable[[], object]]) -> None:
    """Run `steps` one after another, evenly spaced until the deadline (each waits for its slot)."""
    started = time.monotonic()
    gap = max(0.0, run.deadline - started) / (len(steps) + 1)
    for i, step in enumerate(steps):
        time.sleep(max(0.0, started + (i + 1) * gap - time.monotonic()))
        step()


def requests_thread(run: Run, kind: str, abuses: list[Abuse], fault_every: int = 0) -> None:
    def step(abuse: Abuse, i: int) -> Callable[[], object]:
        def go() -> None:
            if fault_every and i % fault_every == 0:
                run.journal.fault(f"{kind}: {abuse.label}")
            run.send(kind, abuse)
        return go

    spread(run, [step(a, i) for i, a in enumerate(abuses)])


# raw sockets: what httpx will not do (stop reading, close mid-stream, trickle a head)
def raw_request(run: Run, path: str, payload: dict[str, Any]) -> bytes:
    body = json.dumps(payload).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{run.server.port}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {run.user_key}\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def connect(run: Run, receive_buffer: int | None = None) -> socket.socket:
    sock = socket.socket()
    if receive_buffer is not None:  # before connecting: the window the server may fill
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", run.server.port))
    return sock


def status_of(head: bytes) -> int | None:
    try:
        return int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else None
    except (IndexError, ValueError):
        return None


def stream_abuse(run: Run, label: str, how: str, hold_s: float) -> None:
    """One streamed chat completion whose client misbehaves:
    `slow`: a tiny receive window, never reads, hangs up after `hold_s`;
    `abandon`: reads the status line and first event, then closes;
    `reset`: reads the first event, then resets the connection (RST, SO_LINGER 0);
    `half-body`: sends half its body, then closes."""
    adapter = run.adapters[len(label) % len(run.adapters)]
    payload = {"model": adapter, "messages": [{"role": "user", "content": "Write a long story about the sea."}],
               "max_tokens": 200, "temperature": 2.0, "seed": 5, "stream": True}
    data = raw_request(run, "/v1/chat/completions", payload)
    started = time.monotonic()
    status: int | None = None
    detail = ""
    try:
        with connect(run, 4096 if how == "slow" else None) as sock:
            if how == "half-body":
                sock.sendall(data[: len(data) - 40])
                time.sleep(0.5)
            else:
                sock.sendall(data)
                if how == "slow":
                    time.sleep(hold_s)
                    sock.settimeout(0.5)
                    with suppress(TimeoutError, OSError):
                        status = status_of(sock.recv(64))
                else:
                    seen = b""
                    while b"data: " not in seen and time.monotonic() - started < 60:
                        chunk = sock.recv(4096)
                        if not chunk:
                            break
                        seen += chunk
                    status = status_of(seen)
                    if how == "reset":
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError as exc:
        detail = f"{type(exc).__name__}: {exc}"
    # no status is fine here (the client left); a status must not be a 5xx
    ok = status is None or status < 500
    run.journal.add(Outcome("streams", "abuse", label, started, time.monotonic(), status, ok, detail))


def slowloris(run: Run) -> None:
    """A request head that trickles in for a few seconds, then gives up."""
    started = time.monotonic()
    detail = ""
    try:
        with connect(run) as sock:
            sock.sendall(f"POST /generate HTTP/1.1\r\nHost: 127.0.0.1:{run.server.port}\r\n".encode())
            for _ in range(6):
                time.sleep(0.5)
                sock.sendall(b"X-Slow: 1\r\n")
    except OSError as exc:
        detail = f"{type(exc).__name__}: {exc}"  # the server cut it: what it should do
    run.journal.add(Outcome("streams", "abuse", "slowloris head", started, time.monotonic(), None, True, detail))


def streams_thread(run: Run) -> None:
    """Slow readers and abandoned streams, a few at a time (each holds a generation of 200 tokens)."""
    def burst(i: int) -> Callable[[], object]:
        def go() -> None:
            run.journal.fault(f"streams: slow readers and abandoned streams #{i + 1}")
            threads = [threading.Thread(target=stream_abuse, args=(run, f"slow reader #{i}.{k}", "slow", 8.0))
                       for k in range(2)]
            threads += [threading.Thread(target=stream_abuse, args=(run, f"{how} #{i}", how, 0.0))
                        for how in ("abandon", "reset", "half-body")]
            threads.append(threading.Thread(target=slowloris, args=(run,)))
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=90)
        return go

    spread(run, [burst(i) for i in range(2 if run.deadline - time.monotonic() >= 10 else 1)])


# ---- registrations and registry faults ----------------------------------------------------------
def admin_register(run: Run, name: str, path: str, good: bool, label: str) -> None:
    started = time.monotonic()
    status: int | None = None
    version: int | None = None
    try:
        response = httpx.post(f"{run.server.url}/admin/adapters", json={"name": name, "path": path},
                              headers=run.auth(True), timeout=120)
        status, text = response.status_code, response.text[:300]
        if 200 <= status < 300:
            version = response.json().get("version")
    except httpx.HTTPError as exc:
        text = f"{type(exc).__name__}: {exc}"
    acknowledged = status is not None and 200 <= status < 300
    if good:
        run.journal.registered(Registration("admin API", name, acknowledged, version, text))
        ok = acknowledged
    else:
        ok = status in (400, 422)
    run.journal.add(Outcome("adapters", "abuse", label, started, time.monotonic(), status, ok, text))


def copy_good(run: Run, name: str) -> Path:
    folder = run.root / "chaos-good" / name
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(run.good_adapter, folder)
    return folder


def cli_register(run: Run, name: str, kill_when: threading.Event | None = None) -> None:
    """`loramux register` against the server's registry. With `kill_when`, `kill -9` it the moment
    that event is set (unless it finished first: then its exit 0 is an acknowledgement like any
    other); the event is a good registration started just before this one ending, so the kill lands
    late in the run, in its validation or its write, not in its imports."""
    folder = copy_good(run, name)
    cmd = [*run.cli(), "register", "--kind", "task", "--name", name, "--path", str(folder)]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=run.cli_env(), cwd=PROJECT_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    killed = False
    if kill_when is not None:
        while proc.poll() is None and not kill_when.wait(0.05):
            pass
        if proc.poll() is None:
            run.journal.fault(f"kill -9 of `loramux register` {time.monotonic() - started:.1f}s in")
            proc.send_signal(signal.SIGKILL)
            killed = True
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=60)
    acknowledged = proc.returncode == 0
    via = "CLI (kill -9)" if kill_when is not None else "CLI"
    said = re.search(rf"registered {re.escape(name)} version (\d+)", out)  # the CLI's acknowledgement
    version = int(said.group(1)) if acknowledged and said else None
    run.journal.registered(Registration(via, name, acknowledged, version, out.strip()[-300:]))
    try:
        json.loads(run.registry.read_text())
        valid = True
    except ValueError:
        valid = False
    leftovers = sorted(p.name for p in run.registry.parent.glob(run.registry.name + ".*.tmp"))
    ended = "killed" if killed else f"exit {proc.returncode}"
    detail = f"{ended}; registry valid JSON: {valid}; temp files {leftovers}"
    run.journal.add(Outcome("cli", "abuse", via, started, time.monotonic(), None,
                            valid and (killed or acknowledged), detail))


def cli_pair(run: Run, i: int, good: bool, victim: bool, rng: random.Random) -> None:
    """A good `loramux register` and, started a moment later beside it, one killed with -9 when the
    good one exits. With more kills than good runs, a fixed wait stands in for the good one."""
    done = threading.Event()

    def late_victim() -> None:
        time.sleep(1.5 + 1.5 * rng.random())  # behind the good one: still running when it ends
        cli_register(run, f"chaos-killed-{i}", done)

    victim_thread = threading.Thread(target=late_victim, name=f"victim-{i}") if victim else None
    if victim_thread is not None:
        victim_thread.start()
    try:
        if good:
            cli_register(run, f"chaos-cli-{i}")
        else:
            time.sleep(8.0)
    finally:
        done.set()
    if victim_thread is not None:
        victim_thread.join()


@contextmanager
def registry_writers_held(run: Run) -> Iterator[None]:
    """The registry's own file lock (every writer, the server's admin API and the CLI, takes it):
    the bytes put back after a truncation are then the file's latest, so the fault itself cannot
    undo a registration and be mistaken for the service losing it."""
    with FileLock(str(run.registry) + ".lock", timeout=120):
        yield


def truncate_registry(run: Run, keep: float) -> None:
    """Truncate the server's registry file in place to `keep` of its size, leave it so for a few
    polls (the watcher must keep the previous state, and say so in /admin/adapters), then write
    the same bytes back; the server must pick them up again."""
    what = f"{keep:.0%} of its size" if keep else "zero bytes"
    with registry_writers_held(run):
        original = run.registry.read_bytes()
        run.journal.fault(f"registry truncated to {what}")
        with run.registry.open("r+b") as handle:
            handle.truncate(int(len(original) * keep))
        deadline = time.monotonic() + max(3 * run.poll_s, 2.0)
        noticed = False
        while time.monotonic() < deadline:
            noticed = noticed or bool(run.admin_view().get("registry_error"))
            time.sleep(0.2)
        with run.registry.open("r+b") as handle:  # no O_TRUNC: the file is never empty on the way back
            handle.write(original)
            handle.flush()
            os.fsync(handle.fileno())
        run.journal.fault(f"registry restored (after {what})")
    recovered = wait_for(lambda: not run.admin_view().get("registry_error"), 30)
    run.journal.note(f"registry truncated to {what}: server reported registry_error while truncated: {noticed}; "
                     f"cleared after restore: {recovered}")


def bad_adapter_step(run: Run, bad: BadAdapter, i: int) -> Callable[[], object]:
    def go() -> None:
        run.journal.fault(f"bad adapter registered: {bad.label}")
        admin_register(run, f"chaos-bad-{i}", bad.path, False, f"register {bad.label}")
    return go


def adapters_thread(run: Run, bad: list[BadAdapter]) -> None:
    """Registrations and registry faults in one sequence, spread over the phase: bad adapters through
    the admin API, good ones through the admin API and the CLI, truncations and CLI kills."""
    rng = random.Random(13)

    def good_api(i: int) -> Callable[[], object]:
        def go() -> None:
            name = f"chaos-api-{i}"
            admin_register(run, name, str(copy_good(run, name).relative_to(run.root)), True, f"register good {name}")
        return go

    def truncate(keep: float) -> Callable[[], object]:
        return lambda: truncate_registry(run, keep)

    def pair(i: int) -> Callable[[], object]:
        return lambda: cli_pair(run, i, i <= run.cli_registrations, i <= run.cli_kills, rng)

    # the CLI runs beside the admin calls (the registry's file lock orders their writes, as it would
    # for an operator's shell)
    cli_steps = [pair(i) for i in range(1, max(run.cli_registrations, run.cli_kills) + 1)]
    cli = threading.Thread(target=spread, args=(run, cli_steps), name="cli", daemon=True)
    cli.start()
    steps: list[Callable[[], object]] = [bad_adapter_step(run, b, i) for i, b in enumerate(bad[:3])]
    steps += [good_api(1), *(truncate(keep) for keep in run.truncations[:1])]
    steps += [bad_adapter_step(run, b, i) for i, b in enumerate(bad[3:], 3)]
    steps += [good_api(2), *(truncate(keep) for keep in run.truncations[1:])]
    spread(run, steps)
    cli.join()


# ---- measurements -------------------------------------------------------------------------------
def wait_for(predicate: Callable[[], bool], timeout: float, step: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except httpx.HTTPError:
            pass
        time.sleep(step)
    return False


def gauge(run: Run, name: str) -> float | None:
    text = httpx.get(f"{run.server.url}/metrics", headers=run.auth(True), timeout=30).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def settle(run: Run, seconds: float, origin: float) -> list[list[float | None]]:
    """[t, in flight, running, waiting] each second until the in-flight gauge is 0 or `seconds` pass:
    what was still holding a slot after the abuse, and for how long."""
    trace: list[list[float | None]] = []
    deadline = time.monotonic() + seconds
    while True:
        text = httpx.get(f"{run.server.url}/metrics", headers=run.auth(True), timeout=30).text
        values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                  if line.startswith(("loramux_queue_depth ", "loramux_engine_running ", "loramux_engine_waiting "))}
        trace.append([round(time.monotonic() - origin, 1), values.get("loramux_queue_depth"),
                      values.get("loramux_engine_running"), values.get("loramux_engine_waiting")])
        if trace[-1][1] == 0 or time.monotonic() > deadline:
            return trace
        time.sleep(1)


def p(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (the p99 of 50 samples is the largest: no interpolation flatters it)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def lost_registrations(run: Run) -> list[dict[str, Any]]:
    """Acknowledged registrations not in the registry file (with their version, where one was given)."""
    data = json.loads(run.registry.read_text())["adapters"]
    lost = []
    for reg in run.journal.registrations:
        if not reg.acknowledged:
            continue
        versions = [v["version"] for v in data.get(reg.name, {}).get("versions", [])]
        if not versions or (reg.version is not None and reg.version not in versions):
            lost.append(asdict(reg))
    return lost


def first_answer_after(faults: list[Fault], normal: list[Outcome], origin: float) -> list[dict[str, Any]]:
    out = []
    for fault in faults:
        after = [o for o in normal if o.started >= fault.at and o.ok]
        first = min((o.ended for o in after), default=None)
        out.append({"fault": fault.name, "at_s": round(fault.at - origin, 2),
                    "first_200_after_s": None if first is None else round(first - fault.at, 3)})
    return out


def drain(run: Run, clients: NormalClients, seconds: float) -> dict[str, Any]:
    """SIGTERM while normal requests are in flight: clients at the rate plus a few longer answers,
    the signal once they are admitted. Sending stops just before it, so every request counted was
    accepted before the signal (and must be answered 200); the server must exit by itself."""
    proc = run.server.proc
    assert proc is not None
    until = time.monotonic() + seconds
    futures = clients.run("drain", lambda: time.monotonic() < until)
    longer = [clients.pool.submit(clients.one, "drain", clients.sent + k, 48) for k in range(6)]
    clients.sent += 6
    time.sleep(0.5)  # admitted: admission takes milliseconds, 48 tokens take seconds
    in_flight = gauge(run, "loramux_queue_depth")
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    results = [f.result(timeout=300) for f in [*longer, *futures]]
    try:
        code: int | None = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        code = None
    return {"accepted_before_signal": len(results), "answered_200": sum(o.ok for o in results),
            "in_flight_at_signal": in_flight, "exit_code": code,
            "exited_after_s": round(time.monotonic() - signalled, 2)}


# ---- the run ------------------------------------------------------------------------------------
def copy_registry(registry: Path, adapter_root: Path, dest: Path) -> tuple[Path, Path]:
    """Copy the registry and every adapter folder its versions name (relative to the adapter root,
    so the copy is valid as is); versions whose folders are gone stay as they are (the server
    reports them failed, as it would on the original)."""
    root = dest / "root"
    data = json.loads(registry.read_text())
    for entry in data["adapters"].values():
        for version in entry.get("versions", []):
            source = adapter_root / version["path"]
            if not Path(version["path"]).is_absolute() and source.is_dir() and not (root / version["path"]).exists():
                shutil.copytree(source, root / version["path"])
    copy = root / "config" / "loras.json"
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(registry, copy)
    return root, copy


def split_cores(share: bool) -> tuple[set[int] | None, set[int] | None]:
    """The server's cores and the load's: the first core for the server, the others for this process
    and what it starts; (None, None) with `share` or on a single core."""
    cores = sorted(os.sched_getaffinity(0))
    if share or len(cores) < 2:
        return None, None
    return {cores[0]}, set(cores[1:])


def chaos(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="loramux-chaos-", dir=args.workdir))
    root, registry = copy_registry(args.registry.resolve(), args.adapter_root.resolve(), workdir)
    snapshot = Registry(registry).load()
    tasks = snapshot.active_versions("task")
    if not tasks or snapshot.router() is None:
        raise SystemExit(f"{args.registry} needs task adapters and a router: run `loramux demo` first")
    user_key, admin_key = f"chaos-user-{secrets.token_hex(8)}", f"chaos-admin-{secrets.token_hex(8)}"
    journal = Journal()
    print(f"[chaos] server on a copy in {workdir} ({len(tasks)} task adapters)", flush=True)
    server_cpus, load_cpus = split_cores(args.share_cores)
    server = start_server(root, registry, workdir / "server.log", cpus=server_cpus, api_keys=user_key,
                          admin_api_keys=admin_key, registry_poll_s=args.poll)
    if load_cpus:  # this thread's cores: every client thread and CLI started from here on inherits them
        os.sched_setaffinity(0, load_cpus)
        print(f"[chaos] server on cores {sorted(server_cpus or ())}, clients and CLIs on {sorted(load_cpus)}",
              flush=True)
    run = Run(server, root, registry, user_key, admin_key, root / tasks[0].path, [v.name for v in tasks],
              journal, 0.0, args.poll, args.cli_kills, max(1, args.cli_registrations), args.truncate, workdir)
    bad = build_bad_adapters(run.good_adapter, root, workdir / "outside" / "adapter")
    clients = NormalClients(server.url, user_key, run.adapters, args.rate, journal)
    result: dict[str, Any] = {}
    origin = time.monotonic()
    try:
        clients.one("warm-up", 0)
        clients.one("warm-up", 1)
        with journal.lock:
            journal.outcomes.clear()
        print(f"[chaos] quiet: {args.duration:g}s at {args.rate:g} req/s", flush=True)
        end = time.monotonic() + args.duration
        for f in clients.run("quiet", lambda: time.monotonic() < end):
            f.result()

        print(f"[chaos] abuse: at least {args.duration:g}s, the same clients beside it", flush=True)
        run.deadline = time.monotonic() + args.duration
        adapter = run.adapters[0]
        admin_path = str(run.good_adapter.relative_to(root))
        families: dict[str, tuple[Callable[..., None], tuple[Any, ...]]] = {
            "oversize": (requests_thread, (run, "oversize", oversize_requests(adapter), 3)),
            "images": (requests_thread, (run, "images", image_requests(), 3)),
            "names": (requests_thread, (run, "names", name_requests(admin_path), 8)),
            "streams": (streams_thread, (run,)),
            "adapters": (adapters_thread, (run, bad)),
        }
        workers = [threading.Thread(target=target, args=targs, name=family, daemon=True)
                   for family, (target, targs) in families.items() if family in args.abuse]
        for worker in workers:
            worker.start()
        hard_stop = run.deadline + args.max_overrun
        for f in clients.run("abuse", lambda: (time.monotonic() < run.deadline or any(w.is_alive() for w in workers))
                             and time.monotonic() < hard_stop):
            f.result()
        for worker in workers:
            worker.join(timeout=5)
        if any(w.is_alive() for w in workers):
            journal.note(f"abuse still running {args.max_overrun:g}s after the phase: hung requests?")

        result["in_flight_trace"] = trace = settle(run, args.settle_s, origin)
        result["in_flight_after"] = trace[-1][1] if trace else None
        result["registrations_missing_live"] = lost_registrations(run)

        print("[chaos] drain: SIGTERM during load", flush=True)
        result["sigterm"] = drain(run, clients, min(args.duration, 5.0))
    finally:
        clients.close()
        server.stop()
    return summarise(run, result, origin, args)


def summarise(run: Run, result: dict[str, Any], origin: float, args: argparse.Namespace) -> dict[str, Any]:
    journal = run.journal
    normal = [o for o in journal.outcomes if o.kind == "normal"]
    latency = {phase: [1000 * (o.ended - o.started) for o in normal if o.phase == phase and o.ok]
               for phase in ("quiet", "abuse")}
    quiet99, abuse99 = p(latency["quiet"], 0.99), p(latency["abuse"], 0.99)
    ratio = abuse99 / quiet99 if quiet99 and abuse99 else None
    quiet = [o for o in normal if o.phase == "quiet" and o.ok]
    third = len(quiet) // 3
    if third >= 3:
        first = sum(o.ended - o.started for o in quiet[:third]) / third
        last = sum(o.ended - o.started for o in quiet[-third:]) / third
        if last > 2 * first:
            journal.note(f"the quiet phase was saturated (latency grew from {first:.2f}s to {last:.2f}s): the "
                         f"server could not keep up with --rate {args.rate:g} on this machine; lower it, or the "
                         "abuse figures measure a backlog")
    fives = [o for o in journal.outcomes if o.status is not None and o.status >= 500]
    lost = lost_registrations(run)  # after the server's exit: the file as it stays
    abuse = [o for o in journal.outcomes if o.kind != "normal"]
    by_kind: dict[str, Counter[str]] = {}
    for o in abuse:
        by_kind.setdefault(o.kind, Counter())[str(o.status)] += 1
    ok_pct = 100.0 * sum(o.ok for o in normal) / len(normal) if normal else 0.0
    result.update({
        "normal": {"sent": len(normal), "answered_200": sum(o.ok for o in normal), "answered_200_pct": round(ok_pct, 3),
                   "by_phase": {ph: {"sent": sum(o.phase == ph for o in normal),
                                     "answered_200": sum(o.ok and o.phase == ph for o in normal)}
                                for ph in ("quiet", "abuse", "drain")},
                   "failed": [asdict(o) for o in normal if not o.ok][:20],
                   # [seconds from the start, latency ms, status, label] of every normal request
                   "timeline": [[round(o.started - origin, 2), round(1000 * (o.ended - o.started)), o.status,
                                 o.label] for o in normal]},
        "latency_ms": {ph: {"n": len(v), "p50": _r(p(v, 0.5)), "p99": _r(p(v, 0.99))} for ph, v in latency.items()},
        "p99_ratio": _r(ratio),
        "status_5xx": len(fives),
        "status_5xx_examples": [asdict(o) for o in fives][:20],
        "registrations": {"attempts": [asdict(r) for r in journal.registrations],
                          "acknowledged": sum(r.acknowledged for r in journal.registrations),
                          "acknowledged_then_missing": len(lost), "missing": lost,
                          "cli_kills_landed": sum(o.kind == "cli" and o.detail.startswith("killed")
                                                  for o in journal.outcomes)},
        "faults": first_answer_after(journal.faults, normal, origin),
        "abuse": {"sent": len(abuse), "by_kind": {k: dict(v) for k, v in by_kind.items()},
                  "unexpected": [asdict(o) for o in abuse if not o.ok]},
        "notes": journal.notes,
        "server_log_errors": crashes(run.server)[:20],
        "server_log": str(run.server.log_path),
        "options": {"duration_s": args.duration, "rate": args.rate, "registry": str(args.registry),
                    "adapter_root": str(args.adapter_root), "cli_kills": args.cli_kills,
                    "cli_registrations": args.cli_registrations, "truncate": args.truncate, "abuse": args.abuse,
                    "share_cores": args.share_cores},
    })
    checks = {
        "normal_200_pct": ok_pct == 100.0 and bool(normal),
        "p99_ratio": ratio is not None and ratio <= args.max_p99_ratio,
        "status_5xx": not fives,
        "in_flight_after": result.get("in_flight_after") == 0,
        "registrations_lost": not lost and not result.get("registrations_missing_live"),
    }
    result["targets"] = {key: {"target": TARGETS[key].format(ratio=args.max_p99_ratio), "met": met}
                         for key, met in checks.items()}
    result["failures"] = [key for key, met in checks.items() if not met]
    return result


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def report(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(120, Console().width))
    table = Table(title="loramux chaos: normal clients beside abuse and faults")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("target")
    normal, lat, sig = result["normal"], result["latency_ms"], result["sigterm"]
    mark = {key: "[green]met[/]" if t["met"] else "[red]MISSED[/]" for key, t in result["targets"].items()}
    table.add_row("normal requests answered 200", f"{normal['answered_200']}/{normal['sent']} "
                  f"({normal['answered_200_pct']:g}%)", f"100% {mark['normal_200_pct']}")
    table.add_row("normal p99 quiet / abuse (ms)", f"{lat['quiet']['p99']} / {lat['abuse']['p99']}",
                  f"(p50 {lat['quiet']['p50']} / {lat['abuse']['p50']})")
    table.add_row("p99 abuse / quiet", f"{result['p99_ratio']}", f"<= 2x {mark['p99_ratio']}")
    table.add_row("5xx responses (all requests)", str(result["status_5xx"]), f"0 {mark['status_5xx']}")
    table.add_row("in-flight gauge after the abuse", str(result["in_flight_after"]), f"0 {mark['in_flight_after']}")
    regs = result["registrations"]
    table.add_row("registrations acknowledged / then missing",
                  f"{regs['acknowledged']} / {regs['acknowledged_then_missing']}",
                  f"0 lost {mark['registrations_lost']}")
    table.add_row("abusive requests sent / unexpected answers", f"{result['abuse']['sent']} / "
                  f"{len(result['abuse']['unexpected'])}", "")
    table.add_row("SIGTERM: accepted before / answered 200", f"{sig['accepted_before_signal']} / {sig['answered_200']}",
                  f"exit {sig['exit_code']} after {sig['exited_after_s']}s")
    console.print(table)
    faults = Table(title="time to the first correct normal answer after each fault")
    faults.add_column("at (s)", justify="right")
    faults.add_column("fault")
    faults.add_column("first 200 after (s)", justify="right")
    for fault in result["faults"]:  # each with the first normal 200 sent after it
        faults.add_row(str(fault["at_s"]), fault["fault"], str(fault["first_200_after_s"]))
    console.print(faults)
    for note in result["notes"]:
        console.print(f"note: {note}")
    for outcome in result["abuse"]["unexpected"]:
        console.print(f"[yellow]unexpected[/] {outcome['kind']} {outcome['label']!r}: {outcome['status']} "
                      f"{outcome['detail'][:160]!r}")
    for outcome in result["status_5xx_examples"] + normal["failed"]:
        console.print(f"[red]failed[/] {outcome['kind']} {outcome['label']!r}: {outcome['status']} "
                      f"{outcome['detail'][:200]!r}")
    for line in result["server_log_errors"]:
        console.print(f"[red]server log[/] {line[:200]}")
    console.print(f"server log: {result['server_log']}")
    console.print("[green]all targets met[/]" if not result["failures"]
                  else f"[red]targets missed: {', '.join(result['failures'])}[/]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", type=Path, default=PROJECT_ROOT / "config" / "loras.json",
                        help="registry to copy (default: the demo's config/loras.json)")
    parser.add_argument("--adapter-root", type=Path, default=PROJECT_ROOT,
                        help="folder the registry's paths are relative to (default: the repository)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of the quiet phase, and at least "
                        "of the abuse phase")
    parser.add_argument("--rate", type=float, default=1.0,
                        help="normal requests per second (at 1 the server, on its own core and one thread, answers "
                             "in about a second; at 2 they already queue in the quiet run)")
    parser.add_argument("--abuse", type=lambda text: [x.strip() for x in text.split(",") if x.strip()],
                        default=list(ABUSE_FAMILIES),
                        help=f"abuse families, comma-separated (default all): {','.join(ABUSE_FAMILIES)}")
    parser.add_argument("--cli-kills", type=int, default=2, help="`loramux register` runs killed with -9")
    parser.add_argument("--cli-registrations", type=int, default=2, help="good `loramux register` runs (at least 1)")
    parser.add_argument("--truncate", type=lambda text: [float(x) for x in text.split(",") if x.strip()],
                        default=[0.5, 0.0], help="registry truncations, as the share of the file kept (0: empty)")
    parser.add_argument("--poll", type=float, default=1.0, help="the server's LORAMUX_REGISTRY_POLL_S")
    parser.add_argument("--max-p99-ratio", type=float, default=2.0)
    parser.add_argument("--share-cores", action="store_true",
                        help="run the server on every core beside the load (default: a core of its own)")
    parser.add_argument("--max-overrun", type=float, default=240.0,
                        help="seconds the abuse may run past --duration before it counts as hung")
    parser.add_argument("--settle-s", type=float, default=60.0, help="time for the in-flight gauge to reach 0")
    parser.add_argument("--workdir", type=Path, default=None, help="where the private copy goes (default: tmp)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of tables")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON result here")
    parser.add_argument("--keep", action="store_true", help="keep the private copy (log, registry) afterwards")
    args = parser.parse_args(argv)
    if not args.registry.exists():
        parser.error(f"{args.registry} does not exist: run `loramux demo` (or pass --registry)")
    result = chaos(args)
    text = json.dumps(result, indent=2, default=str)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.json:
        print(text)
    else:
        report(result)
    if not args.keep and not result["failures"]:  # kept on failure: the server log is the evidence
        shutil.rmtree(Path(result["server_log"]).parent, ignore_errors=True)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
