"""Schema fuzzing: schemathesis generates valid and invalid requests from /openapi.json; no
response may be a 5xx. Runs against the tiny-model app, so model time is negligible."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from aurora_spec.server.testing import ServerThread
from tests.server_helpers import tiny_app

pytestmark = pytest.mark.slow


def schemathesis_cli() -> str | None:
    local = Path(sys.executable).with_name("schemathesis")
    return str(local) if local.exists() else shutil.which("schemathesis")


def test_schema_fuzz_finds_no_server_error(tmp_path: Path) -> None:
    cli = schemathesis_cli()
    if cli is None:
        pytest.skip("schemathesis is not installed")
    # The admin key is accepted on every route, so the admin routes are fuzzed too.
    app, _ = tiny_app(api_key="user-key", admin_key="admin-key")
    with ServerThread(app) as url:
        run = subprocess.run(
            [cli, "run", f"{url}/openapi.json", "--checks", "not_a_server_error",
             # The examples phase is off: schemathesis 4.32 crashes generating from our schema
             # there (a hypothesis/CPython recursion error, not a server response).
             # One worker: with two, hypothesis parses lambda sources in two threads and
             # CPython 3.11's ast constructor can fail with "recursion depth mismatch"
             # (python/cpython#106905): a crash of the fuzzer, seen once in CI.
             "--phases", "coverage,fuzzing", "--max-examples", "30", "--seed", "7",
             "--workers", "1",
             "--header", "Authorization: Bearer admin-key", "--request-timeout", "30",
             "--suppress-health-check", "all", "--no-shrink"],
            capture_output=True, text=True, timeout=240, cwd=tmp_path)
        assert httpx.get(url + "/health").status_code == 200  # still serving
        served = app.state.aurora.metrics.requests.collect()[0].samples
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert sum(s.value for s in served if s.name.endswith("_total")) > 20  # fuzz reached the model
