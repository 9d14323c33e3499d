#!/usr/bin/env python3
"""Start `aurora serve`, send some requests, screenshot the live page in headless Chromium.

    .venv/bin/python scripts/screenshot_live_page.py [--out live_page.png] [--requests 12]
        [--max-tokens 24] [-- extra `aurora serve` flags]

Needs a Chromium binary (Debian/Ubuntu: apt-get install -y chromium). Prints the PNG path and
the number of data points the page drew.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aurora_spec.server.testing import chromium_render, free_port, wait_healthy  # noqa: E402

PROMPTS = [
    ("chat", "Explain speculative decoding in two sentences."),
    ("code", "Write a Python function that reverses a string."),
    ("math", "What is 17 times 23? Show the steps."),
    ("chat", "Give me three tips for a good night's sleep."),
]


def start_server(port: int, extra: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [sys.executable, "-m", "aurora_spec.cli", "serve", "--port", str(port),
           "--threads", env["OMP_NUM_THREADS"], *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env)


def send_requests(url: str, n: int, max_tokens: int) -> None:
    model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    for i in range(n):
        domain, prompt = PROMPTS[i % len(PROMPTS)]
        body = {"model": model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens, "temperature": 0, "aurora": {"domain": domain}}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
        r.raise_for_status()
        print(f"request {i + 1}/{n}: tau {r.json()['aurora']['tau']:.2f}", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="live_page.png")
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("serve_args", nargs="*", help="extra flags for aurora serve (after --)")
    a = ap.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(port, a.serve_args)
    try:
        wait_healthy(url, proc)
        send_requests(url, a.requests, a.max_tokens)
        out = Path(a.out).resolve()
        dom = chromium_render(url + "/", out)
        points = dom.count('class="point"')
        print(f"{out} ({points} data points drawn)")
    finally:
        proc.terminate()
        proc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
