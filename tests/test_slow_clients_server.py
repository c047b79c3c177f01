"""Slow clients hold nothing for ever (issue 13, item 5), and a stream that fails still ends with
[DONE] (item 8), on a real server with its connection limits set from the settings.

A client that stops reading a stream: its generation runs on (it never waits for the client),
under the request deadline, and the admission slot is free as soon as the generation ends; once
`stream_drain_timeout_s` has passed the server closes the connection. Before the fix the generation
was driven by the sends: once the socket buffers were full it stopped, the deadline was never
checked again, and the slot (and the engine row) stayed taken as long as the connection was open.
uvicorn's limits come from the settings too: a request head that trickles in (slowloris) is cut
after `header_timeout_s`, a body after `body_timeout_s` (408), an idle keep-alive connection after
`keep_alive_timeout_s`, a head over `max_header_bytes` is a 400, and beyond `max_connections` uvicorn answers 503.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from service.registration import register_adapter
from service.settings import Settings
from tests.conftest import CACHE_DIR
from tests.live_server import crashes, metric, private_copy, start_server
from tests.support import ServerProcess

pytestmark = pytest.mark.slow

DEADLINE_S = 12.0
DRAIN_S = 2.0
HEAD_S = 2.0
MAX_CONNECTIONS = 8
# random tokens (temperature 2) rarely hit EOS: ~170 bytes per chat.completion.chunk, far more than
# the socket buffers between the server and a client that reads nothing hold
LONG_CHAT = {"model": "alpha", "messages": [{"role": "user", "content": "Write a very long story about the sea."}],
             "max_tokens": 1000, "temperature": 2.0, "seed": 11, "stream": True}


@pytest.fixture(scope="module")
def server(served_registry, adapter_root, tmp_path_factory) -> Iterator[ServerProcess]:
    root, registry = private_copy(served_registry, adapter_root, tmp_path_factory.mktemp("slow_root"))
    proc = start_server(root, registry, tmp_path_factory.mktemp("slow") / "server.log",
                        request_timeout_s=DEADLINE_S, stream_drain_timeout_s=DRAIN_S, header_timeout_s=HEAD_S,
                        body_timeout_s=HEAD_S, keep_alive_timeout_s=1, max_header_bytes=4096,
                        max_connections=MAX_CONNECTIONS, max_model_len=2048)
    yield proc
    proc.stop()


# the longest name there is: ~240 bytes per chunk, so a reader that takes nothing fills the socket buffers
# (8 KiB each side, fixed by `send_buffer_bytes`) within ~150 tokens, long before its 400 tokens end
LONG_NAME = "slow-reader-" + "x" * 52


@pytest.fixture(scope="module")
def patient_server(served_registry, adapter_root, base_model, tmp_path_factory) -> Iterator[ServerProcess]:
    """The default deadline (120 s): what bounds a non-reading client's hold here is the end of its
    generation, not the deadline."""
    root, registry = private_copy(served_registry, adapter_root, tmp_path_factory.mktemp("patient_root"))
    settings = Settings(registry=registry, adapter_root=root, cache_dir=CACHE_DIR)
    register_adapter(settings, base_model, "task", LONG_NAME, root / "alpha")
    proc = start_server(root, registry, tmp_path_factory.mktemp("patient") / "server.log",
                        stream_drain_timeout_s=DRAIN_S, max_model_len=2048, send_buffer_bytes=8192)
    yield proc
    proc.stop()


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.25)
    return predicate()


def connect(server: ServerProcess, receive_buffer: int | None = None) -> socket.socket:
    sock = socket.socket()
    if receive_buffer is not None:  # set before connecting: the window the server may fill
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect(("127.0.0.1", server.port))
    return sock


def request_bytes(server: ServerProcess, path: str, payload: dict) -> bytes:
    body = json.dumps(payload).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Read (and drop) whatever arrives until the server closes the connection, or `within` passes."""
    sock.settimeout(0.5)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if sock.recv(65536) == b"":
                return True
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True
    return False


def in_flight(server: ServerProcess) -> tuple[float, float]:
    return metric(server, "loramux_queue_depth"), metric(server, "loramux_engine_running")


def test_a_client_that_stops_reading_holds_its_slot_only_while_it_generates(patient_server):
    """Before the fix the generation stopped when the buffers were full, a few hundred tokens in, and
    the slot stayed taken for as long as the connection stayed open."""
    server = patient_server
    payload = {**LONG_CHAT, "model": LONG_NAME, "max_tokens": 400, "stream_options": {"include_usage": True}}
    with connect(server, receive_buffer=4096) as sock:
        sock.sendall(request_bytes(server, "/v1/chat/completions", payload))
        assert wait_for(lambda: in_flight(server)[0] == 1, 30)  # admitted and generating
        # the generation runs to its end although nothing is read, and the slot is free at once,
        # while the connection is still open
        assert wait_for(lambda: in_flight(server) == (0, 0), 200), in_flight(server)
        r = httpx.post(f"{server.url}/generate", json={"prompt": "Hi", "adapter": "beta", "max_tokens": 2},
                       timeout=60)
        assert r.status_code == 200, r.text
        assert closed_by_server(sock, DRAIN_S + 30)  # the drain time over, the server lets it go
    assert not crashes(server)


def test_the_deadline_holds_for_a_client_that_stops_reading(server):
    with connect(server, receive_buffer=4096) as sock:
        started = time.monotonic()
        sock.sendall(request_bytes(server, "/v1/chat/completions", LONG_CHAT))
        assert wait_for(lambda: in_flight(server)[0] == 1, 30)  # admitted and generating
        # it never reads: the generation ends at the deadline at the latest, giving the slot back
        assert wait_for(lambda: in_flight(server) == (0, 0), DEADLINE_S + 10), in_flight(server)
        assert time.monotonic() - started < DEADLINE_S + 10
        assert closed_by_server(sock, DRAIN_S + 15)
    assert not crashes(server)


@pytest.mark.parametrize("path", ["/generate", "/v1/chat/completions"])
def test_a_stream_cut_by_the_deadline_ends_with_an_error_event_and_done(server, path):
    payload = {**LONG_CHAT, "prompt": "Write a very long story about the sea."}
    payload.pop("messages" if path == "/generate" else "prompt")
    if path == "/generate":
        payload["adapter"] = payload.pop("model")
    with httpx.stream("POST", f"{server.url}{path}", json=payload, timeout=DEADLINE_S + 30) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    error = json.loads(events[-2])["error"]
    assert error["code"] == 504 and error["type"] == "timeout_error" and error["request_id"], error
    assert wait_for(lambda: in_flight(server) == (0, 0), 10)


def test_a_request_head_that_trickles_in_is_cut(server):
    with connect(server) as sock:
        sock.sendall(f"POST /generate HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n".encode())
        started = time.monotonic()
        for _ in range(3):  # one header line now and then: never a complete head
            time.sleep(0.5)
            sock.sendall(b"X-Slow: 1\r\n")
        assert closed_by_server(sock, HEAD_S + 5)
        assert time.monotonic() - started < HEAD_S + 5


def test_a_body_that_trickles_in_is_a_408(server):
    with connect(server) as sock:
        sock.sendall(f"POST /generate HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: application/json"
                     f"\r\nContent-Length: 400\r\n\r\n{{\"prompt\": ".encode())
        sock.settimeout(HEAD_S + 10)
        answer = sock.recv(65536).decode()
        assert answer.startswith("HTTP/1.1 408"), answer
        while '"param"' not in answer:  # the body may come in a packet of its own
            answer += sock.recv(65536).decode()
        error = json.loads(answer.partition("\r\n\r\n")[2])["error"]
        assert error["type"] == "timeout_error" and error["param"] == "body" and error["request_id"], error


def test_an_idle_keep_alive_connection_is_closed(server):
    with connect(server) as sock:
        sock.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode())
        sock.settimeout(10)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert closed_by_server(sock, 4)  # keep_alive_timeout_s=1 (uvicorn's own default is 5)
        assert time.monotonic() - started < 3


def test_a_request_head_larger_than_the_limit_is_refused(server):
    """h11 buffers an incomplete head up to `max_header_bytes` (uvicorn's default is 16 KiB)."""
    with connect(server) as sock:
        sock.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nX-Big: {'x' * 6000}".encode())
        sock.settimeout(HEAD_S + 5)
        assert sock.recv(65536).startswith(b"HTTP/1.1 400")
    assert httpx.get(f"{server.url}/health", headers={"X-Small": "x" * 1000}, timeout=30).status_code == 200


def test_connections_beyond_the_limit_get_503(server):
    idle = [connect(server) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.3)
        r = httpx.get(f"{server.url}/health", timeout=30)
        assert r.status_code == 503
    finally:
        for sock in idle:
            sock.close()
    assert wait_for(lambda: httpx.get(f"{server.url}/health", timeout=30).status_code == 200, 10)
