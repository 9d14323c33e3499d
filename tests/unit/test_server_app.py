"""The server on a tiny random model: protocol, errors, auth, queue, cancellation, learning flags.

The app runs for real (uvicorn on a loopback port, engine thread, learner seam); only the model is
tiny and the tokenizer byte-level, so every test takes milliseconds of model time.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from aurora_spec.server.testing import ServerThread
from tests.polling import wait_until
from tests.server_helpers import CAPACITY, VOCAB, ByteTokenizer, post, reference, tiny_app

@pytest.fixture(scope="module")
def server():
    app, learner = tiny_app()
    with ServerThread(app) as url:
        yield url, app, learner
    assert ("stop", True) in learner.calls  # shutdown saved the draft


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


# ---- happy paths ------------------------------------------------------------------------------


def test_completion_equals_engine_greedy_and_carries_speculation_stats(server, client) -> None:
    tok = ByteTokenizer()
    r = client.completions.create(model="tiny", prompt="hello world", max_tokens=24, temperature=0)
    want = tok.decode(reference(tok.encode("hello world"), 24))
    assert r.choices[0].text == want
    assert r.choices[0].finish_reason in ("stop", "length")
    u = r.usage.model_dump()
    assert u["drafted_tokens"] >= u["accepted_tokens"] >= 0
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    aurora = r.model_extra["aurora"]
    assert aurora["tau"] >= 1 and aurora["draft_version"] == 0 and aurora["learn"] is True


@pytest.mark.parametrize("chat", [False, True])
def test_streaming_equals_non_streaming(client, chat: bool) -> None:
    kw = dict(model="tiny", max_tokens=40, temperature=0)
    if chat:
        msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ünïcode ✓"}]
        full = client.chat.completions.create(messages=msgs, **kw).choices[0].message.content
        chunks = list(client.chat.completions.create(
            messages=msgs, stream=True, stream_options={"include_usage": True}, **kw))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        full = client.completions.create(prompt="stream me", **kw).choices[0].text
        chunks = list(client.completions.create(
            prompt="stream me", stream=True, stream_options={"include_usage": True}, **kw))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and "aurora" in finals[0].model_extra


def test_stop_string_cuts_text(client) -> None:
    full = client.completions.create(model="tiny", prompt="abc", max_tokens=40,
                                     temperature=0).choices[0].text
    assert len(full) > 6
    stop = full[4:6]
    cut = client.completions.create(model="tiny", prompt="abc", max_tokens=40, temperature=0,
                                    stop=[stop, "\x00never"])
    assert cut.choices[0].text == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="abc", max_tokens=40, temperature=0, stop=stop, stream=True))
    assert streamed == cut.choices[0].text


def test_sampling_with_seed_is_reproducible(client) -> None:
    kw = dict(model="tiny", prompt="seeded", max_tokens=16, temperature=0.9, top_p=0.9, seed=5,
              extra_body={"top_k": 20})
    assert client.completions.create(**kw).choices[0].text == \
        client.completions.create(**kw).choices[0].text


def test_models_health_stats_and_live_page(server) -> None:
    url = server[0]
    assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == ["tiny"]
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["live_version"] == 3 and health["model"] == "tiny"
    post(url, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 4})
    stats = httpx.get(url + "/stats").json()
    assert stats["records"] and {"tau", "tokens_per_s", "t"} <= set(stats["records"][0])
    assert stats["status"]["loss"] is None  # NaN is not JSON
    later = httpx.get(url + "/stats", params={"since": stats["seq"]}).json()
    assert later["records"] == []
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "<svg" in page.text and "src=\"http" not in page.text


def test_metrics_exposes_speculation_queue_and_learner(server) -> None:
    url = server[0]
    post(url, "/v1/completions", {"model": "tiny", "prompt": "tagged", "max_tokens": 8,
                                  "aurora": {"domain": "code"}})
    text = httpx.get(url + "/metrics").text
    for name in ("aurora_request_tau_bucket", 'aurora_domain_request_tau_count{domain="code"}',
                 "aurora_alpha{position=\"1\"}", "aurora_queue_depth", "aurora_tokens_per_second",
                 "aurora_trainer_step 7.0", "aurora_trace_buffer_fill 0.25",
                 "aurora_dropped_traces_total 1.0", "aurora_draft_swaps_total 2.0",
                 "aurora_draft_rollbacks_total", "aurora_vocab_coverage 0.9",
                 "aurora_vocab_coverage_unseen 0.85",
                 "aurora_draft_version 3.0", "aurora_drafted_tokens_total",
                 "aurora_draft_position_proposed_total", "aurora_drafter_hits_local",
                 "aurora_drafter_accepted_global"):
        assert name in text, name
    assert "aurora_trainer_loss" not in text  # NaN loss: not exported


def test_learning_opt_out_by_field_and_header(server) -> None:
    url, _, learner = server
    body = {"model": "tiny", "prompt": "private data", "max_tokens": 12, "temperature": 0}
    ids = {"default": post(url, "/v1/completions", body).json()["id"],
           "field": post(url, "/v1/completions", {**body, "aurora": {"no_learn": True}}).json()["id"],
           "header": post(url, "/v1/completions", body,
                          headers={"X-Aurora-No-Learn": "1"}).json()["id"]}
    assert ids["default"] in learner.traces
    assert ids["field"] not in learner.traces and ids["header"] not in learner.traces


# ---- bad input --------------------------------------------------------------------------------

OK = {"model": "tiny", "prompt": "hi", "max_tokens": 4}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
BAD = [
    ("/v1/completions", b"{not json", 400),
    ("/v1/completions", b'{"model": "tiny", "prompt": "\xff\xfe"}', 400),  # invalid UTF-8
    ("/v1/completions", b"[1, 2]", 400),
    ("/v1/completions", {"prompt": "hi"}, 400),  # missing model
    ("/v1/completions", {"model": "tiny"}, 400),  # missing prompt
    ("/v1/completions", {**OK, "max_tokens": -1}, 400),
    ("/v1/completions", {**OK, "max_tokens": 0}, 400),
    ("/v1/completions", {**OK, "max_tokens": 10**30}, 400),
    ("/v1/completions", {**OK, "max_tokens": "many"}, 400),
    ("/v1/completions", {**OK, "temperature": "hot"}, 400),
    ("/v1/completions", {**OK, "temperature": -1}, 400),
    ("/v1/completions", {**OK, "top_p": 0}, 400),
    ("/v1/completions", {**OK, "n": 2}, 400),
    ("/v1/completions", {**OK, "stop": ""}, 400),
    ("/v1/completions", {**OK, "prompt": ""}, 400),
    ("/v1/completions", {**OK, "prompt": [VOCAB + 5]}, 400),
    ("/v1/completions", {**OK, "prompt": "x" * (CAPACITY + 10)}, 400),  # over the context
    ("/v1/completions", {**OK, "model": "gpt-4"}, 404),
    ("/v1/completions", {**OK, "aurora": {"domain": "bad domain!"}}, 400),
    ("/v1/completions", {**OK, "logprobs": 3}, 400),
    ("/v1/chat/completions", {**CHAT, "messages": []}, 400),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("/v1/chat/completions", {**CHAT, "messages": "hi"}, 400),
    ("/v1/chat/completions", {**CHAT, "messages": [{"content": "no role"}]}, 400),
]


@pytest.mark.parametrize(("path", "body", "status"), BAD)
def test_bad_input_gets_openai_error_and_server_keeps_serving(server, path, body, status) -> None:
    url = server[0]
    r = post(url, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert post(url, "/v1/completions", OK).status_code == 200


def test_body_size_limit_with_and_without_content_length(server) -> None:
    url = server[0]
    big = json.dumps({**OK, "prompt": "x" * (2 << 20)}).encode()
    assert post(url, "/v1/completions", big).status_code == 413

    def chunked():
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]

    r = httpx.post(url + "/v1/completions", content=chunked(), timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_admin_routes_are_absent_without_admin_key(server) -> None:
    r = httpx.post(server[0] + "/admin/swap")
    assert r.status_code == 404 and "error" in r.json()


# ---- auth -------------------------------------------------------------------------------------


def test_api_key_and_admin_key() -> None:
    app, learner = tiny_app(api_key="user-key", admin_key="admin-key")
    user, admin = {"Authorization": "Bearer user-key"}, {"Authorization": "Bearer admin-key"}
    with ServerThread(app) as url:
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert httpx.get(url + "/v1/models", headers=user).status_code == 200
        assert httpx.get(url + "/metrics").status_code == 401
        assert httpx.get(url + "/stats").status_code == 401
        assert httpx.get(url + "/openapi.json").status_code == 401
        assert post(url, "/v1/completions", OK).status_code == 401
        assert post(url, "/v1/completions", OK, headers=user).status_code == 200
        assert httpx.get(url + "/health").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        for action in ("pause", "resume", "swap", "rollback", "reset"):
            assert httpx.post(f"{url}/admin/{action}").status_code == 401
            assert httpx.post(f"{url}/admin/{action}", headers=user).status_code == 403
            r = httpx.post(f"{url}/admin/{action}", headers=admin)
            assert r.status_code == 200 and r.json()["action"] == action
        assert learner.calls[1:6] == ["pause", "resume", "swap", "rollback", "reset"]


# ---- queue, cancellation, shutdown ------------------------------------------------------------


def hold_engine(engine) -> threading.Event:
    """Block the engine thread between steps until the returned event is set."""
    gate = threading.Event()
    engine.call_between_steps(lambda: gate.wait(30))
    return gate


def test_full_queue_answers_429_with_retry_after() -> None:
    app, _ = tiny_app(slots=1, max_queue=1)
    st = app.state.aurora
    with ServerThread(app) as url, ThreadPoolExecutor(2) as pool:
        gate = hold_engine(st.engine)
        futures = [pool.submit(post, url, "/v1/completions", OK) for _ in range(2)]
        wait_until(lambda: st.admission.in_flight == 2)
        r = post(url, "/v1/completions", OK)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
        gate.set()
        assert [f.result().status_code for f in futures] == [200, 200]
        assert post(url, "/v1/completions", OK).status_code == 200


def slow_steps(engine, seconds: float = 0.05) -> None:
    step = engine.step
    engine.step = lambda: (time.sleep(seconds), step())[1]


def test_cancelled_stream_and_dropped_request_free_their_slots() -> None:
    app, _ = tiny_app(slots=1, max_queue=0)
    st = app.state.aurora
    slow_steps(st.engine)
    long = {"model": "tiny", "prompt": "go", "max_tokens": 200, "temperature": 0}
    with ServerThread(app) as url:
        with httpx.stream("POST", url + "/v1/completions", json={**long, "stream": True}) as r:
            next(r.iter_lines())  # the first event arrived: the request holds the only slot
        wait_until(lambda: st.admission.in_flight == 0)
        assert st.engine.runner.free_slots == 1
        with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
            httpx.post(url + "/v1/completions", json=long, timeout=0.3)
        wait_until(lambda: st.admission.in_flight == 0)
        assert post(url, "/v1/completions", OK).status_code == 200
        reasons = [r["finish_reason"] for r in httpx.get(url + "/stats").json()["records"]]
        assert reasons[:2] == ["abort", "abort"] and reasons[2] in ("stop", "length")


def test_shutdown_finishes_in_flight_requests_then_saves() -> None:
    app, learner = tiny_app(slots=1)
    slow_steps(app.state.aurora.engine)
    server = ServerThread(app)
    url = server.__enter__()
    body = {"model": "tiny", "prompt": "go", "max_tokens": 30, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        events = r.iter_lines()
        lines = [next(events)]
        server.server.should_exit = True  # what uvicorn does on SIGTERM
        lines += list(events)
    server.__exit__(None, None, None)
    events = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    assert [x for x in lines if x][-1] == "data: [DONE]"
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert learner.calls[-1] == ("stop", True)
