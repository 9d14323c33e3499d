"""`aurora serve` does its torch work on one thread (aurora_spec/engine/loop.py).

Torch gives every thread that runs a parallel CPU kernel an OpenMP team of its own; with two
teams (model loaded on the main thread, decoded on the engine thread) libgomp throttles its
spinning and decoding ran ~30% slower. The server as `cmd_serve` builds it runs in a fresh
interpreter (a pytest process's main thread has run kernels long before), serves a request with
learning on, and reports which thread runs kernels on how many cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts OS threads")]

SERVER = """
import json, os, sys, threading
import httpx, torch
from aurora_spec.cli import build_parser
from aurora_spec.server.cli import build_app
from aurora_spec.server.testing import ServerThread

app = build_app(build_parser().parse_args(sys.argv[1:]))
st = app.state.aurora
with ServerThread(app) as url:
    r = httpx.post(url + "/v1/completions", timeout=120, json={
        "model": "smollm2-135m", "prompt": "def add(a, b):", "max_tokens": 8, "temperature": 0})
    engine_threads = []
    asked = threading.Event()
    st.engine.call_between_steps(lambda: (engine_threads.append(torch.get_num_threads()),
                                          asked.set()))
    asked.wait(60)
    big = torch.randn(1 << 21)  # far above torch's grain size: parallel on a team of 2
    before = len(os.listdir("/proc/self/task"))
    torch.cat([big, big]).sum()
    print(json.dumps({
        "status": r.status_code, "tokens": r.json()["usage"]["completion_tokens"],
        "engine_threads": engine_threads, "main_threads": torch.get_num_threads(),
        "main_kernel_new_os_threads": len(os.listdir("/proc/self/task")) - before,
        "learner_serving_threads": st.learner.serving_threads()}))
"""


def test_serve_runs_torch_on_the_engine_thread_only(smollm2_dir) -> None:
    argv = ["serve", "--threads", "2", "--max-context", "256", "--max-batch", "1",
            "--trainer-idle"]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run([sys.executable, "-c", SERVER, *argv], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {
        "status": 200, "tokens": 8,
        "engine_threads": [2],  # serving decodes on every core it was given ...
        "main_threads": 1,  # ... and the main (HTTP) thread runs any kernel on one core:
        "main_kernel_new_os_threads": 0,  # no second OpenMP team ...
        "learner_serving_threads": 2,  # ... and the learner counted serving's threads there
    }
