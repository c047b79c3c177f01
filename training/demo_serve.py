"""`loramux demo --serve` (what `make run` does): serve first, then build the demo into the live service.

A newcomer should get answers within minutes, not after half an hour of training. So the server
starts as a child process (`python -m loramux serve`) the moment the base model is ready, and the
demo trains in this process and registers each adapter as it finishes; the server's registry
watcher hot-loads them, exactly as it would in production. The build status file says what is
still coming (`service.build_status`). When the demo is done the server keeps serving in the
foreground; Ctrl-C or SIGTERM stops both. With adapters already registered (a second `make run`)
the demo is skipped and this process becomes the server at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

from service.registry import Registry
from service.settings import Settings
from training.demo import DemoPlan, run_demo

SERVE = [sys.executable, "-m", "loramux", "serve"]


def serve_command(host: str | None, port: int | None) -> list[str]:
    command = list(SERVE)
    if host is not None:
        command += ["--host", host]
    if port is not None:
        command += ["--port", str(port)]
    return command


def demo_and_serve(settings: Settings, plan: DemoPlan, host: str | None, port: int | None,
                   echo: Callable[[str], Any], if_missing: bool = False, resume: str | None = None) -> int:
    """Serve while the demo builds (see the module docstring); returns the server's exit code."""
    command = serve_command(host, port)
    if if_missing and _has_adapters(settings):
        echo(f"registry {settings.registry} already has adapters; serving them")
        sys.stdout.flush()
        os.execv(command[0], command)  # this process becomes the server: signals reach it directly
    server: subprocess.Popen[bytes] | None = None

    def start_server() -> None:
        nonlocal server
        server = subprocess.Popen(command)
        echo(f"[demo] serving on http://{host or settings.host}:{port or settings.port} while the demo builds "
             "(GET /ready says what is still coming)")
        threading.Thread(target=_report_exit, args=(server, echo), daemon=True).start()

    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        run_demo(settings, plan, echo=echo, resume=resume, on_started=start_server)
        if server is None:  # pragma: no cover - run_demo always calls on_started
            return 0
        echo("[demo] done; the server goes on (Ctrl-C to stop)")
        return server.wait()
    except KeyboardInterrupt:
        echo("[demo] interrupted; stopping the server")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGTERM)  # the server drains in-flight requests, then exits
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


def _has_adapters(settings: Settings) -> bool:
    return settings.registry.is_file() and bool(Registry(settings.registry).load().entries)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _report_exit(server: subprocess.Popen[bytes], echo: Callable[[str], Any]) -> None:
    code = server.wait()
    if code not in (0, -signal.SIGTERM):
        echo(f"[demo] the server exited with code {code}; the demo goes on, `loramux serve` serves its "
             "adapters once it is done")
