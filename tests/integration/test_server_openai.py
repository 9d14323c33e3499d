"""`aurora serve` on the bundled SmolLM2, driven by the official `openai` client over loopback.

One server (a real `aurora serve` subprocess, default drafter and learning) serves the module.
Greedy answers must equal what `aurora generate` computes (same runtime path, target only).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import openai
import pytest

from aurora_spec.cli import encode_prompt, stop_token_ids
from aurora_spec.config import DrafterConfig, ModelConfig
from aurora_spec.engine.engine import EngineConfig
from aurora_spec.server import testing
from aurora_spec.server.testing import chromium_binary, chromium_render, free_port
from aurora_spec.types import SamplingParams

pytestmark = pytest.mark.integration

KEY, ADMIN = "test-user-key", "test-admin-key"
AUTH, ADMIN_AUTH = {"Authorization": f"Bearer {KEY}"}, {"Authorization": f"Bearer {ADMIN}"}
MODEL, CONTEXT, SLOTS, QUEUE = "smollm2-135m", 512, 4, 40
COMPLETION_PROMPTS = ["The capital of France is", "def fibonacci(n):"]
CHAT_PROMPTS = ["What is 2+2?", "Name a colour."]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def server(smollm2_dir, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [sys.executable, "-m", "aurora_spec.cli", "serve", "--port", str(port),
           "--threads", "1", "--max-context", str(CONTEXT), "--max-batch", str(SLOTS),
           "--max-queue", str(QUEUE), "--max-tokens-limit", "256", "--api-key", KEY,
           "--admin-key", ADMIN]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        yield url, proc, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    try:
        testing.wait_healthy(url, proc, timeout)
    except RuntimeError as e:
        pytest.fail(f"{e}:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(smollm2_dir):
    """`aurora generate` (cmd_generate's path), target only: prompt -> greedy text."""
    from aurora_spec.runtime import build_runtime

    rt = build_runtime(ModelConfig(MODEL, threads=1, max_context=CONTEXT, max_slots=1),
                       DrafterConfig("none"), EngineConfig(calibrate=False))
    stops = stop_token_ids(rt.info, rt.tokenizer)

    def generate(prompt: str, chat: bool) -> str:
        ids = encode_prompt(rt.tokenizer, prompt, chat)
        out = rt.engine.generate(ids, SamplingParams(MAX_TOKENS, stop_token_ids=stops))
        return rt.tokenizer.decode(list(out.token_ids), skip_special_tokens=True)

    return generate


# ---- losslessness through the API -------------------------------------------------------------


@pytest.mark.parametrize("prompt", COMPLETION_PROMPTS)
def test_completion_greedy_equals_generate(client, reference, prompt: str) -> None:
    want = reference(prompt, chat=False)
    kw = dict(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    r = client.completions.create(**kw)
    assert r.choices[0].text == want
    assert r.usage.completion_tokens > 0 and r.model_extra["aurora"]["tau"] >= 1.0
    assert "drafted_tokens" in r.usage.model_extra
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw)
                       if c.choices)
    assert streamed == want


@pytest.mark.parametrize("prompt", CHAT_PROMPTS)
def test_chat_greedy_equals_generate(client, reference, prompt: str) -> None:
    want = reference(prompt, chat=True)
    kw = dict(model=MODEL, messages=[{"role": "user", "content": prompt}],
              max_tokens=MAX_TOKENS, temperature=0)
    r = client.chat.completions.create(**kw)
    assert r.choices[0].message.content == want
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


# ---- concurrency, queue, cancellation ---------------------------------------------------------


async def one_client(c: openai.AsyncOpenAI, i: int) -> list[str]:
    """Four requests in a row (alternating endpoints and streaming); returns failures."""
    failures = []
    for j in range(4):
        try:
            if (i + j) % 2:
                stream = await c.completions.create(model=MODEL, prompt=f"{i} plus one is",
                                                    max_tokens=3, temperature=0, stream=True)
                async for _ in stream:
                    pass
            else:
                await c.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": f"Say {i}"}],
                    max_tokens=3, temperature=0.7, seed=i)
        except openai.APIError as e:
            failures.append(f"client {i} request {j}: {e}")
    return failures


def test_32_concurrent_clients_x4_all_served(server) -> None:
    async def run() -> list[str]:
        c = openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0,
                               timeout=300)
        results = await asyncio.gather(*(one_client(c, i) for i in range(32)))
        await c.close()
        return [f for r in results for f in r]

    assert asyncio.run(run()) == []


def test_full_queue_429_then_cancelled_streams_free_their_slots(server) -> None:
    url = server[0]
    long = {"model": MODEL, "prompt": "Once upon a time, in a land far away,", "max_tokens": 200,
            "temperature": 0, "stream": True}

    async def run() -> None:
        limits = httpx.Limits(max_connections=SLOTS + QUEUE + 8)
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=120,
                                     limits=limits) as c:
            async with AsyncExitStack() as streams:
                for _ in range(SLOTS + QUEUE):  # headers come back once admitted
                    r = await streams.enter_async_context(c.stream("POST", "/v1/completions",
                                                                   json=long))
                    assert r.status_code == 200
                assert (await c.get("/stats")).json()["queued"] > 0  # still held, not finished
                full = await c.post("/v1/completions", json={**long, "stream": False})
                assert full.status_code == 429, full.text
                assert int(full.headers["retry-after"]) >= 1
                assert full.json()["error"]["code"] == "queue_full"
            # Every stream is closed now: the server must abort them all and free the slots.
            deadline = time.monotonic() + 60
            while True:
                stats = (await c.get("/stats")).json()
                if stats["running"] == 0 and stats["queued"] == 0:
                    break
                assert time.monotonic() < deadline, stats
                await asyncio.sleep(0.2)
            ok = await c.post("/v1/completions", json={**long, "stream": False, "max_tokens": 4})
            assert ok.status_code == 200

    asyncio.run(run())


# ---- bad input, auth --------------------------------------------------------------------------

OK = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}


@pytest.mark.parametrize(("path", "body", "status", "code"), [
    ("/v1/completions", {**OK, "model": "gpt-4o"}, 404, "model_not_found"),
    ("/v1/completions", {**OK, "prompt": "word " * (CONTEXT + 50)}, 400, "context_length_exceeded"),
    ("/v1/completions", {**OK, "max_tokens": -5}, 400, "invalid_value"),
    ("/v1/completions", {**OK, "max_tokens": 10**9}, 400, "max_tokens_too_large"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "invalid_value"),
    ("/v1/completions", b'{"model": "smollm2-135m", "prompt": "\xc3\x28"}', 400, None),
    ("/v1/completions", b'{"model": ', 400, "invalid_json"),
])
def test_bad_input_is_a_4xx_and_serving_continues(server, path, body, status, code) -> None:
    url = server[0]
    if isinstance(body, bytes):
        r = httpx.post(url + path, content=body, timeout=30,
                       headers={**AUTH, "content-type": "application/json"})
    else:
        r = httpx.post(url + path, json=body, headers=AUTH, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]
    assert httpx.post(url + "/v1/completions", json=OK, headers=AUTH, timeout=60).status_code == 200


def test_auth_and_admin_keys(server) -> None:
    url = server[0]
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/v1/models").status_code == 401
    assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer bad"}).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="bad", max_retries=0).models.list()
    assert httpx.get(url + "/admin/status", headers=AUTH).status_code == 403
    assert httpx.post(url + "/admin/pause", headers=AUTH).status_code == 403
    status = httpx.get(url + "/admin/status", headers=ADMIN_AUTH)
    assert status.status_code == 200 and "live_version" in status.json()["status"]


def test_opt_out_keeps_traces_from_the_learner(server) -> None:
    url = server[0]

    def recorded() -> int | None:
        return httpx.get(url + "/admin/status", headers=ADMIN_AUTH).json()["status"].get(
            "recorded_traces")

    if recorded() is None:
        pytest.skip("the serving learner does not report recorded_traces (learning off)")
    body = {"model": MODEL, "prompt": "my password is", "max_tokens": 6, "temperature": 0}
    before = recorded()
    r = httpx.post(url + "/v1/completions", json=body,
                   headers={**AUTH, "X-Aurora-No-Learn": "1"}, timeout=60)
    assert r.status_code == 200 and r.json()["aurora"]["learn"] is False
    r = httpx.post(url + "/v1/completions", json={**body, "aurora": {"no_learn": True}},
                   headers=AUTH, timeout=60)
    assert r.status_code == 200 and recorded() == before
    httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=60)
    assert recorded() > before


def test_metrics_and_health(server) -> None:
    url = server[0]
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL and "live_version" in health
    text = httpx.get(url + "/metrics", headers=AUTH).text
    for name in ("aurora_request_tau_count", "aurora_alpha", "aurora_queue_depth",
                 "aurora_tokens_per_second", "aurora_draft_version", "aurora_drafted_tokens_total",
                 'aurora_requests_total{endpoint="chat"'):
        assert name in text, name


def test_the_trainer_process_reports_to_the_servers_log_and_metrics(server) -> None:
    """The trainer process logs at the server's --log-level (info) to the server's stderr, and
    its status reaches /metrics: its allocator setting and peak memory (aurora_spec/memory.py)."""
    url, _, log = server
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        text = httpx.get(url + "/metrics", headers=AUTH).text
        if "trainer started" in log.read_text() and "aurora_learner_heap_buffers" in text:
            break
        time.sleep(1)
    assert re.search(r"trainer\[\d+\] .*trainer started \(.*heap buffers\)", log.read_text())
    assert "aurora_learner_heap_buffers 1.0" in text
    rss = re.search(r"^aurora_learner_max_rss_mb (\S+)$", text, re.M)
    assert rss is not None and float(rss.group(1)) > 0


# ---- live page --------------------------------------------------------------------------------


def test_live_page_renders_data_points_in_chromium(server, tmp_path) -> None:
    if chromium_binary() is None:
        pytest.skip("chromium is not installed (Debian package: chromium)")
    png = tmp_path / "live.png"
    dom = chromium_render(f"{server[0]}/#key={KEY}", png)
    assert dom.count('class="point"') >= 10  # the page fetched /stats and drew requests
    assert 'class="head-alone"' in dom  # the head's own tau beside the system's
    assert "HTTP 401" not in dom
    assert png.stat().st_size > 10_000


# ---- last: shutdown ---------------------------------------------------------------------------


def test_sigterm_finishes_in_flight_request_then_exits(server) -> None:
    url, proc, _ = server
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0,
            "stream": True}
    lines: list[str] = []
    started = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=AUTH,
                          timeout=120) as r:
            for line in r.iter_lines():
                lines.append(line)
                started.set()

    t = threading.Thread(target=stream)
    t.start()
    assert started.wait(60)
    proc.send_signal(signal.SIGTERM)
    t.join(120)
    # uvicorn re-raises SIGTERM after its graceful shutdown, so the exit status says "terminated"
    assert proc.wait(60) in (0, -signal.SIGTERM)
    assert [x for x in lines if x][-1] == "data: [DONE]"
    assert '"finish_reason":"length"' in "".join(lines)
