"""aurora bench report: per-arm summaries (medians, speedups, divergence), the PASS/FAIL/INFO
checks, results.json / report.md / bench.png, and the report's tables (requests over time,
trainers, serving threads, training periods, recovery after a domain change, swap markers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aurora_spec.bench import plots, report, stream_report


def _rec(arm: str, i: int, domain: str, tps: float, tau: float | None, div: int | None = None):
    return {"arm": arm, "index": i, "domain": domain, "segment": 0, "tokens_per_s": tps,
            "tau": tau, "tokens": 10, "decode_tokens": 9, "decode_s": 9 / tps,
            "proposed": None if tau is None else 8, "accepted": None if tau is None else 4,
            "draft_version": 0, "diverged_at": div}


def _records() -> list[dict]:
    recs = []
    for i, d in enumerate(["summarization", "chat"] * 2):
        recs.append(_rec("none", i, d, 20.0 + i, 1.0))
        recs.append(_rec("ngram", i, d, (40.0 if d == "summarization" else 18.0) + i, 2.0,
                         div=5 if i == 3 else None))
        recs.append(_rec("hf", i, d, 10.0 + i, None))
    return recs


def test_summarise_medians_speedups_divergence() -> None:
    arms = report.summarise(_records(), [("none", "none"), ("ngram", "ngram"), ("hf", "hf")])
    none, ngram, hf = arms["none"], arms["ngram"], arms["hf"]
    assert none["tokens_per_s"] == 21.5 and none["requests"] == 4
    assert none["tokens_per_s_p10"] == pytest.approx(20.3) and none["tau"] == 1.0
    assert none["speedup_vs_hf"] == pytest.approx(21.5 / 11.5, abs=1e-3)
    assert ngram["per_domain"]["summarization"] == {
        "tokens_per_s": 41.0, "tau": 2.0, "requests": 2, "speedup_vs_none": pytest.approx(41 / 21,
                                                                                          abs=1e-3)}
    assert ngram["per_domain"]["chat"]["speedup_vs_none"] == pytest.approx(20 / 22, abs=1e-3)
    assert ngram["acceptance"] == 0.5 and hf["tau"] is None and hf["acceptance"] is None
    assert ngram["diverged_count"] == 1 and ngram["diverged_requests"] == 0.25
    assert ngram["first_divergence"] == [5] and none["diverged_requests"] == 0.0


def test_checks_pass_fail_info() -> None:
    pairs = [("none", "none"), ("ngram", "ngram"), ("hf", "hf")]
    arms = report.summarise(_records(), pairs)
    checks = {(c["name"], c["text"].split()[0]): c for c in report.evaluate_checks(arms, "float32")}
    assert checks[("engine_vs_hf", "target-only")]["status"] == "PASS"  # 1.87x
    assert checks[("ngram_summarization", "ngram")]["status"] == "PASS"  # 1.95x
    slow = checks[("no_slowdown", "ngram")]
    assert slow["status"] == "FAIL" and "chat" in slow["text"]  # 0.91x on chat
    assert checks[("lossless", "ngram")]["status"] == "FAIL"  # 1 request diverged in float32
    assert checks[("divergence", "hf")]["status"] == "INFO"
    bf16 = {c["name"]: c for c in report.evaluate_checks(arms, "bfloat16")}
    assert bf16["engine_vs_hf"]["status"] == "INFO" and bf16["divergence"]["status"] == "INFO"
    only = report.evaluate_checks(report.summarise(_records(), [("ngram", "ngram")]), "float32")
    assert {c["status"] for c in only} == {"SKIP"}


def test_write_report(tmp_path: Path) -> None:
    config = {"command": "aurora bench --arms none,ngram,hf", "dtype": "float32", "model": "m",
              "threads": 1, "max_tokens": 10, "mode": "stream", "requests": 4, "warmup": 0}
    recs = _records()
    for r in recs:
        r["segment"] = 0 if r["index"] < 2 else 1
    results = report.build_results(config, [("none", "none"), ("ngram", "ngram"), ("hf", "hf")],
                                   recs)
    paths = report.write_report(tmp_path / "out", results, plot=True)
    assert [p.name for p in paths] == ["results.json", "report.md", "bench.png"]
    loaded = json.loads(paths[0].read_text())
    assert set(loaded) == {"config", "arms", "checks", "requests"}
    assert loaded["arms"]["ngram"]["speedup_vs_none"] == results["arms"]["ngram"]["speedup_vs_none"]
    md = paths[1].read_text()
    assert "`aurora bench --arms none,ngram,hf`" in md
    assert "| `ngram` |" in md and "summarization" in md and "FAIL  ngram slowest domain" in md
    assert paths[2].stat().st_size > 1000


def test_swap_markers_ignore_requests_that_did_not_draft() -> None:
    recs = [{"index": i, "draft_version": v, "proposed": p}
            for i, (v, p) in enumerate([(1, 3), (1, 2), (0, 0), (1, 4), (2, 3), (0, 0), (2, 1)])]
    assert plots.swap_indices(recs) == [4]


def test_requests_over_time_table() -> None:
    """The report's over-time rows: first 10, blocks of 50 (stream: segments), last 50, all;
    per arm mean tau, the head alone's tau when recorded, and the ratio of medians to none."""
    recs = []
    for i in range(60):
        recs.append({"arm": "none", "index": i, "tau": 1.0, "tokens_per_s": 10.0,
                     "domain": "chat", "segment": 0})
        recs.append({"arm": "online", "index": i, "tau": 2.0, "tau_head": 1.5,
                     "tokens_per_s": 10.0 if i < 50 else 30.0, "domain": "chat", "segment": 0})
    assert [r[0] for r in stream_report.request_ranges(recs)] == [
        "first 10 (0-9)", "0-49", "50-59", "last 50 (10-59)", "all (0-59)"]
    results = {"arms": {"none": {}, "online": {}}, "requests": recs}
    lines = stream_report.over_time_lines(results)
    assert "| 50-59 | 1.00 · 10.0 | 2.00 (1.50) · 30.0 · 3.00x |" in lines
    assert "| 0-49 | 1.00 · 10.0 | 2.00 (1.50) · 10.0 · 1.00x |" in lines
    for r in recs:
        r["segment"] = 0 if r["index"] < 30 else 1
        r["domain"] = "chat" if r["index"] < 30 else "code"
    labels = [r[0] for r in stream_report.request_ranges(recs)]
    assert labels[1:3] == ["segment 0: chat (0-29)", "segment 1: code (30-59)"]
    assert stream_report.over_time_lines({"arms": {"none": {}}, "requests": recs[:20]}) == []
    # Three segments: a row for all after the first change (the shift goal's range); without a
    # none arm the ratios are to the first static head.
    for r in recs:
        r["segment"] = min(r["index"] // 20, 2)
        if r["arm"] == "none":
            r["arm"] = "static:h"
    labels = [r[0] for r in stream_report.request_ranges(recs)]
    assert labels[4] == "after the first change (20-59)", labels
    lines = stream_report.over_time_lines({"arms": {"static:h": {}, "online": {}},
                                           "requests": recs})
    assert any("ratio to `static:h`" in line for line in lines)
    assert "| after the first change (20-59) | 1.00 · 10.0 | 2.00 (1.50) · 10.0 · 1.00x |" in lines
    assert "| segment 2: code (40-59) | 1.00 · 10.0 | 2.00 (1.50) · 20.0 · 2.00x |" in lines
    # With none and a static head, online arms get both ratios: to none and to the static head.
    recs += [{**r, "arm": "none", "tokens_per_s": 5.0} for r in recs if r["arm"] == "static:h"]
    lines = stream_report.over_time_lines({"arms": {"none": {}, "static:h": {}, "online": {}},
                                           "requests": recs})
    assert any("also their ratio to `static:h`" in line for line in lines)
    assert ("| segment 2: code (40-59) | 1.00 · 5.0 | 1.00 · 10.0 · 2.00x "
            "| 2.00 (1.50) · 20.0 · 4.00x · 2.00x vs static |") in lines


def test_report_has_a_row_per_trainer() -> None:
    """The report's Trainers section: one row per arm whose status has a trainer, from the
    statuses the bench saves (arm_status); none without one."""
    status = {"trainer_step": 1187, "step_cpu_ms": 627.4, "step_ms": 1464.2, "swaps": 8,
              "rollbacks": 0, "gates": 47, "gate_rejections": 39, "rests": 0}
    results = {"arm_status": {"online-from:h@idle": status, "eagle3": {"draft_versions": 1}}}
    lines = stream_report.trainer_lines(results)
    assert "| `online-from:h@idle` | 1187 | 627.4 | 1464.2 | 8 | 0 | 47 (39) | 0 |" in lines
    assert not any("eagle3" in line for line in lines)
    assert stream_report.trainer_lines({"arm_status": {"eagle3": {}}}) == []


def test_report_splits_requests_by_serving_threads() -> None:
    """Serving threads: per arm that ran on more than one thread count, the requests on each and
    their median ratio to the reference arm, over the last 50 and over all; arms on one count
    only (the reference, a static head) get no row."""
    recs = [{"arm": "none", "index": i, "tokens_per_s": 10.0} for i in range(60)]
    recs += [{"arm": "static:h", "index": i, "tokens_per_s": 12.0, "threads": 2}
             for i in range(60)]
    # online: the first 30 requests on 1 thread at 1.1x, the last 30 on 2 at 1.5x and 1.3x
    recs += [{"arm": "online", "index": i, "threads": 1 if i < 30 else 2,
              "tokens_per_s": 11.0 if i < 30 else (15.0 if i % 2 else 13.0)} for i in range(60)]
    lines = stream_report.thread_lines({"arms": {"none": {}, "static:h": {}, "online": {}},
                                        "requests": recs})
    assert "| arm | requests | on 2 thread(s) | on 1 thread(s) |" in lines
    assert "| `online` | last 50 (10-59) | 30 · 1.40x | 20 · 1.10x |" in lines
    assert "| `online` | all (0-59) | 30 · 1.40x | 30 · 1.10x |" in lines
    assert not any("static:h" in line for line in lines)
    single = [{**r, "threads": 2} for r in recs]
    assert stream_report.thread_lines({"arms": {"none": {}, "online": {}},
                                       "requests": single}) == []


def test_report_lists_training_periods() -> None:
    """Training periods: runs of requests an arm served on fewer threads (its trainer training),
    each with the version before and after it; one that ends on the same version counts as
    gaining nothing, one the run ended in counts in neither column."""
    threads = [1] * 5 + [2] * 5 + [1] * 3 + [2] * 4 + [1] * 3
    versions = [0, 0, 0, 1, 1] + [1] * 15
    recs = [{"arm": "online", "index": i, "threads": t, "draft_version": v}
            for i, (t, v) in enumerate(zip(threads, versions, strict=True))]
    recs += [{"arm": "static:h", "index": i, "threads": 2, "draft_version": 0} for i in range(20)]
    recs += [{"arm": "none", "index": i} for i in range(20)]
    assert stream_report.training_periods([r for r in recs if r["arm"] == "online"]) == [
        (0, 4, 0, 1), (10, 12, 1, 1), (17, 19, 1, 1)]
    lines = stream_report.training_lines({"arms": {"none": {}, "static:h": {}, "online": {}},
                                          "requests": recs})
    assert lines[-1] == ("| `online` | 1 · 5 | 1 · 3 | 0-4 (v0->v1), 10-12 (v1), "
                         "17-19 (v1, run ended) |")
    assert not any("static:h" in line or "`none`" in line for line in lines)
    steady = [r for r in recs if r["arm"] != "online"]
    assert stream_report.training_lines({"arms": {"none": {}, "static:h": {}},
                                         "requests": steady}) == []


def test_requests_that_changed_thread_count_are_mixed() -> None:
    """A request whose steps ran on two thread counts (the trainer woke or rested while it was
    served) is 'mixed' in Serving threads, not counted under the count it started on, and it
    starts or ends a training period; records without threads_steps (older results) keep the
    count they started on."""
    recs = [{"arm": "none", "index": i, "tokens_per_s": 10.0} for i in range(6)]
    steps = [{"2": 30}, {"2": 20, "1": 8}, {"1": 25}, {"2": 5, "1": 20}, {"2": 30}, None]
    recs += [{"arm": "online", "index": i, "threads": 2, "tokens_per_s": 10.0 + i,
              "draft_version": int(i >= 3), **({"threads_steps": st} if st else {})}
             for i, st in enumerate(steps)]
    assert [stream_report.thread_class(r) for r in recs[6:]] == [2, "mixed", 1, "mixed", 2, 2]
    lines = stream_report.thread_lines({"arms": {"none": {}, "online": {}}, "requests": recs})
    assert "| arm | requests | on 2 thread(s) | on 1 thread(s) | mixed |" in lines
    assert "| `online` | all (0-5) | 3 · 1.40x | 1 · 1.20x | 2 · 1.20x |" in lines
    periods = stream_report.training_periods([r for r in recs if r["arm"] == "online"])
    assert periods == [(1, 3, 0, 1)]


def test_recovery_after_a_domain_change() -> None:
    """After each segment change: the level before (last 50), the new segment's mean, and after
    how many requests a 20-request mean is back to 90% of the level ('-': never)."""
    # The first 20-request mean with at most 4 of the 1.0s (>= 1.8) ends at the 21st request.
    assert stream_report.recovery([1.0] * 5 + [2.0] * 30, 1.8, window=20) == 21
    assert stream_report.recovery([1.0] * 40, 1.8, window=20) is None
    recs = []
    for i in range(100):
        seg = int(i >= 60)
        tau = 2.0 if i < 60 else (1.0 if i < 70 else 2.0)  # falls at the change, recovers
        for arm, t in (("none", 1.0), ("online", tau), ("static", 1.0 if seg else 2.0)):
            recs.append({"arm": arm, "index": i, "tau": t, "tokens_per_s": 10.0,
                         "domain": "code" if seg else "chat", "segment": seg})
    arms = {"none": {"tau": 1.0}, "online": {"tau": 1.8}, "static": {"tau": 1.6}}
    lines = stream_report.recovery_lines({"arms": arms, "requests": recs})
    assert lines[-1] == "| chat -> code (at 60) | 2.00 -> 1.75, 26 | 2.00 -> 1.00, - |"
    single = [r for r in recs if r["index"] < 60]
    assert stream_report.recovery_lines({"arms": arms, "requests": single}) == []


def test_target_only_on_other_kernels_is_measured_not_failed() -> None:
    """A target-only arm on F.linear (runtime.target_kernels) rounds differently from the packed
    kernels speculating arms verify on: against it a difference is INFO; against none@packed,
    the exact reference, it fails in float32."""
    recs = [r for r in _records() if r["arm"] != "hf"]
    pairs = [("none", "none"), ("ngram", "ngram")]
    kernels = {"none": "plain", "ngram": "packed"}
    arms = report.summarise(recs, pairs)
    checks = report.evaluate_checks(arms, "float32", "none", kernels)
    div = next(c for c in checks if c["text"].startswith("ngram greedy output"))
    assert div["status"] == "INFO" and "none@packed" in div["text"]
    same = report.evaluate_checks(arms, "float32", "none", {**kernels, "none": "packed"})
    assert next(c for c in same if c["name"] == "lossless")["status"] == "FAIL"
    # The reference's own diverged share is 0 whichever none it is; the other none is compared.
    both = [*recs, *({**r, "arm": "none@packed", "diverged_at": None} for r in recs
                     if r["arm"] == "none")]
    summary = report.summarise(both, [*pairs, ("none@packed", "none")], "none@packed")
    assert summary["none@packed"]["diverged_requests"] == 0.0
    assert summary["none"]["diverged_requests"] == 0.0 and summary["ngram"]["diverged_count"] == 1
