"""The optional on-disk trace log: lines, privacy, retention, back-pressure, server wiring."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import httpx
import pytest
import torch

from aurora_spec.cli import build_parser
from aurora_spec.server.cli import server_settings
from aurora_spec.server.testing import ServerThread
from aurora_spec.server.tracelog import TraceLog, file_name
from aurora_spec.types import Proposal, StepTrace, VerifyResult
from tests.polling import wait_until

KEYS = {"time", "request_id", "domain", "context_len", "root_token", "proposal_tokens",
        "proposal_parents", "accepted_nodes", "next_token", "bonus", "draft_version"}


def trace(rid: str = "cmpl-1", domain: str | None = "code") -> StepTrace:
    prop = Proposal((11, 12, 13), (-1, 0, 0), torch.rand(3, 50), draft_version=4)
    res = VerifyResult((0, 2), (11, 13), 99, True, 3)
    return StepTrace(rid, 17, 7, prop, res, torch.full((4, 24), 0.123456),
                     torch.full((4, 8), 0.654321), domain)


def lines(d: Path) -> list[dict]:
    out = []
    for f in sorted(d.glob("traces-*.jsonl")):
        out += [json.loads(x) for x in f.read_text().splitlines()]
    return out


def test_lines_are_written_parse_and_hold_no_tensors(tmp_path: Path) -> None:
    got: list[StepTrace] = []
    now = time.time()
    tl = TraceLog(tmp_path / "t", clock=lambda: now).start()
    sink = tl.wrap(got.append)
    for i in range(5):
        sink(trace(f"cmpl-{i}"))
    tl.stop()
    assert len(got) == 5  # the learner still gets every trace
    files = list((tmp_path / "t").iterdir())
    assert [f.name for f in files] == [file_name(now)]
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "t").stat().st_mode) & 0o077 == 0
    recs = lines(tmp_path / "t")
    assert [r["request_id"] for r in recs] == [f"cmpl-{i}" for i in range(5)]
    r = recs[0]
    assert set(r) == KEYS
    assert (r["context_len"], r["root_token"], r["proposal_tokens"], r["proposal_parents"],
            r["accepted_nodes"], r["next_token"], r["bonus"], r["draft_version"], r["domain"]) == (
        17, 7, [11, 12, 13], [-1, 0, 0], [0, 2], 99, True, 4, "code")
    raw = files[0].read_text()
    assert "0.123" not in raw and "0.654" not in raw and "hidden" not in raw
    for v in r.values():  # flat: ints, strings, bools and int lists only
        assert isinstance(v, int | float | str | bool) or all(isinstance(x, int) for x in v)
    s = tl.stats()
    assert (s["written"], s["dropped"], s["bytes"]) == (5, 0, len(raw.encode()))


def test_hourly_files_follow_the_step_time(tmp_path: Path) -> None:
    now = [1_700_000_000.0]
    tl = TraceLog(tmp_path, clock=lambda: now[0]).start()
    tl.record(trace("a"))
    now[0] += 3600
    tl.record(trace("b"))
    tl.stop()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "traces-20231114-22.jsonl", "traces-20231114-23.jsonl"]


def make_file(d: Path, name: str, size: int, age_h: float) -> Path:
    p = d / name
    p.write_bytes(b"x" * size)
    t = time.time() - age_h * 3600
    os.utime(p, (t, t))
    return p


def test_retention_deletes_old_files_and_enforces_byte_cap(tmp_path: Path) -> None:
    old = make_file(tmp_path, "traces-20200101-00.jsonl", 10, age_h=30)
    a = make_file(tmp_path, "traces-20200102-00.jsonl", 400, age_h=5)
    b = make_file(tmp_path, "traces-20200102-01.jsonl", 400, age_h=4)
    c = make_file(tmp_path, "traces-20200102-02.jsonl", 400, age_h=3)
    other = make_file(tmp_path, "notes.txt", 5000, age_h=100)  # not ours: never touched
    tl = TraceLog(tmp_path, retention_hours=24, max_bytes=1000)
    tl.start()  # the start sweep
    try:
        assert not old.exists() and not a.exists()  # too old; then oldest while over the cap
        assert b.exists() and c.exists() and other.exists()
        assert tl.stats()["files_deleted"] == 2 and tl.stats()["dir_bytes"] == 800
        os.utime(b, (time.time() - 25 * 3600,) * 2)
        assert tl.sweep() == 1 and not b.exists() and c.exists()
        assert tl.stats()["files_deleted"] == 3
    finally:
        tl.stop()


def test_writes_past_the_cap_trigger_a_sweep(tmp_path: Path) -> None:
    old = make_file(tmp_path, "traces-20200101-00.jsonl", 900, age_h=1)
    tl = TraceLog(tmp_path, max_bytes=1000, sweep_interval_s=3600).start()
    for i in range(10):
        tl.record(trace(f"r{i}"))
    wait_until(lambda: tl.stats()["written"] == 10 and not old.exists())
    tl.stop()
    assert tl.stats()["dir_bytes"] <= 1000
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) <= 1000


def test_full_queue_drops_instead_of_blocking(tmp_path: Path) -> None:
    tl = TraceLog(tmp_path, queue_size=4)  # not started: nothing drains the queue
    t0 = time.perf_counter()
    for i in range(100):
        tl.record(trace(f"r{i}"))
    assert time.perf_counter() - t0 < 1.0
    assert tl.stats()["dropped"] == 96 and tl.stats()["queued"] == 4
    tl.start()
    tl.stop()
    assert tl.stats()["written"] == 4 and len(lines(tmp_path)) == 4


def test_bad_trace_never_raises(tmp_path: Path) -> None:
    tl = TraceLog(tmp_path)
    tl.record(object())  # type: ignore[arg-type]
    assert tl.stats()["errors"] == 1


def parse(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_flags_and_defaults(tmp_path: Path) -> None:
    s = server_settings(parse())
    assert (s.trace_dir, s.trace_retention_hours, s.trace_max_mb) == (None, 24.0, 256.0)
    s = server_settings(parse("--trace-dir", str(tmp_path), "--trace-retention-hours", "2",
                              "--trace-max-mb", "8"))
    assert (s.trace_dir, s.trace_retention_hours, s.trace_max_mb) == (str(tmp_path), 2.0, 8.0)
    from aurora_spec.cli import UsageError
    with pytest.raises(UsageError):
        server_settings(parse("--trace-dir", str(tmp_path), "--trace-max-mb", "0"))


# ---- through the server (tiny model) ----------------------------------------------------------


def test_server_writes_traces_except_opted_out_and_reports_metrics(tmp_path: Path) -> None:
    from tests.server_helpers import post, tiny_app

    d = tmp_path / "traces"
    app, learner = tiny_app(trace_dir=str(d))
    body = {"model": "tiny", "prompt": "private data", "max_tokens": 12, "temperature": 0}
    with ServerThread(app) as url:
        kept = post(url, "/v1/completions", body).json()["id"]
        out = [post(url, "/v1/completions", {**body, "aurora": {"no_learn": True}}).json()["id"],
               post(url, "/v1/completions", body, headers={"X-Aurora-No-Learn": "1"}).json()["id"]]
        wait_until(lambda: app.state.tracelog.stats()["written"] == len(learner.traces))
        text = httpx.get(url + "/metrics").text
    ids = {r["request_id"] for r in lines(d)}
    assert ids == {kept} and not set(out) & set(learner.traces)
    assert "private" not in "".join(p.read_text() for p in d.iterdir())
    n = len(lines(d))
    assert n == len(learner.traces) > 0
    assert f"aurora_trace_log_written_total {float(n)}" in text
    for name in ("aurora_trace_log_dropped_total", "aurora_trace_log_bytes_total",
                 "aurora_trace_log_files_deleted_total"):
        assert name in text, name


def test_server_without_trace_dir_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    from tests.server_helpers import tiny_app

    monkeypatch.chdir(tmp_path)
    app, _ = tiny_app()
    assert app.state.tracelog is None
    app, _ = tiny_app(trace_dir=str(tmp_path / "x"), learn=False)  # learning off: nothing kept
    assert app.state.tracelog is None and not (tmp_path / "x").exists()
