"""Single-request speed of a real `aurora serve`: starts it with the flags given after `--`,
sends N greedy chat requests (code prompts from the bundled traffic) one at a time over
loopback, prints the median tokens/s, the share of CPU time left idle while it decoded, and the
server's OS threads by name (the engine thread and its OpenMP workers are "aurora-engine").

    python scripts/serve_speed.py -n 8 -- --threads 2 --no-learn --drafter none
"""

import argparse
import collections
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import psutil

from aurora_spec.bench.traffic import load_domain, resolve_traffic_dir
from aurora_spec.server.testing import free_port, wait_healthy


def thread_names(pid: int) -> dict[str, int]:
    names: collections.Counter[str] = collections.Counter()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            names[f.read().strip()] += 1
    return dict(names)


def main() -> None:
    argv = sys.argv[1:]
    serve_args = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("-n", "--requests", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    a = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile(prefix="aurora-serve-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "aurora_spec.cli", "serve", "--port",
                             str(port), *serve_args], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url, proc)
        prompts = load_domain(resolve_traffic_dir(None), "code")[:a.requests]
        speeds: list[float] = []
        psutil.cpu_times_percent(interval=None)  # the idle share below is measured from here
        for prompt in prompts:
            t = time.perf_counter()
            r = httpx.post(url + "/v1/chat/completions", timeout=600, json={
                "model": "smollm2-135m", "messages": [{"role": "user", "content": prompt.prompt}],
                "max_tokens": a.max_tokens, "temperature": 0})
            r.raise_for_status()
            speeds.append(r.json()["usage"]["completion_tokens"] / (time.perf_counter() - t))
        idle = psutil.cpu_times_percent(interval=None).idle / 100
        print(json.dumps({"serve_args": serve_args,
                          "median_tokens_per_s": round(statistics.median(speeds), 1),
                          "tokens_per_s": [round(s, 1) for s in speeds],
                          "cpu_idle_share": round(idle, 2),
                          "threads": thread_names(proc.pid), "server_log": log.name}))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


if __name__ == "__main__":
    main()
