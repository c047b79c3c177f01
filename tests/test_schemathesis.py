"""schemathesis 4 against the live server's own `/openapi.json`: positive and negative cases for
every operation, a bounded number of examples, and these checks on every response: no 5xx, the
status code, content type, headers and body all as documented, invalid input refused, and auth not
ignored (each secured operation is replayed without its key).

`positive_data_acceptance` is left out on purpose: whether a schema-valid request can be served
depends on state no static schema holds (which adapters are registered, the context length, the
configured limits), and those refusals are documented 4xx answers.

The run uses the `schemathesis run` CLI in a subprocess: the pytest integration loads the schema
at import time, before any fixture could start the server.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.live_server import crashes, private_copy, start_server
from tests.support import ServerProcess

ADMIN = "fuzz-admin-key"
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "ignored_auth",
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fuzz_server(served_registry, adapter_root, tmp_path_factory) -> Iterator[ServerProcess]:
    """A private copy of the adapters: the fuzzer calls DELETE and activate on whatever it finds.
    Small generation limits keep each schema-valid generation to a few tokens."""
    root, registry = private_copy(served_registry, adapter_root, tmp_path_factory.mktemp("fuzz_root"))
    server = start_server(root, registry, tmp_path_factory.mktemp("fuzz") / "server.log",
                          api_keys="fuzz-user-key", admin_api_keys=ADMIN, max_tokens_limit=8, default_max_tokens=4,
                          max_model_len=256, request_timeout_s=60)
    yield server
    server.stop()


def test_openapi_schema_holds_for_generated_requests(fuzz_server: ServerProcess, tmp_path: Path):
    schemathesis = Path(sys.executable).parent / "schemathesis"
    cmd = [
        str(schemathesis), "run", f"{fuzz_server.url}/openapi.json",
        "--header", f"Authorization: Bearer {ADMIN}",
        "--checks", ",".join(CHECKS),
        "--mode", "all",  # positive and negative cases
        "--phases", "examples,coverage,fuzzing",
        "--max-examples", "25",
        "--seed", "20260",
        "--generation-database", "none",
        "--request-timeout", "60",
        "--max-failures", "20",
        "--no-color",
        "--report", "junit", "--report-dir", str(tmp_path),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report[-12000:]
    generated = re.search(r"(\d+) generated", report)
    assert generated and int(generated.group(1)) >= 300, report[-3000:]
    # the fuzzer reached the model, not only the validators
    metrics = httpx.get(f"{fuzz_server.url}/metrics", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30).text
    served = re.findall(r'^loramux_requests_total\{adapter="[^"]*",endpoint="(\w+)",status="200"\} (\S+)$', metrics,
                        re.MULTILINE)
    assert {endpoint for endpoint, count in served if float(count) > 0} >= {"generate", "route"}, served
    assert crashes(fuzz_server) == []
