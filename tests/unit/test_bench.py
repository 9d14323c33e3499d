"""aurora bench without the bundled model: traffic selection and streams, the interleaved runner
(fake arms), divergence, the command line's checks of bad input, and runs on tiny models
(engine vs hf, the draft-length policy in records, an online arm at partial load, steps per
thread count). Arm specs are in test_bench_arms.py, the report in test_bench_report.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aurora_spec.bench.arms import (
    ArmOutput,
    EngineArm,
    HfArm,
    first_divergence,
    normalise_output,
)
from aurora_spec.bench.runner import BenchRequest, mark_divergence, run_interleaved
from aurora_spec.bench.traffic import (
    TRAFFIC_ENV,
    DomainPool,
    Prompt,
    TrafficError,
    default_traffic_dir,
    list_domains,
    load_domain,
    make_pools,
    parse_stream,
    plan_mixed,
    plan_stream,
    resolve_traffic_dir,
)
from aurora_spec.cli import main
from tests.bench_helpers import planned


def write_traffic(root: Path, domains: dict[str, int]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for d, n in domains.items():
        with (root / f"{d}.jsonl").open("w") as f:
            for i in range(n):
                f.write(json.dumps({"id": f"{d}:{i}", "domain": d, "source": "test",
                                    "prompt": f"{d} prompt number {i}"}) + "\n")
    return root


# ---- traffic ---------------------------------------------------------------------------------


def test_load_and_list(tmp_path: Path) -> None:
    t = write_traffic(tmp_path / "traffic", {"chat": 5, "code": 3})
    assert list_domains(t) == ["chat", "code"]
    ps = load_domain(t, "code")
    assert [p.id for p in ps] == ["code:0", "code:1", "code:2"]
    assert ps[0] == Prompt("code:0", "code", "test", "code prompt number 0")
    with pytest.raises(TrafficError, match="unknown domain 'math'.*chat, code"):
        load_domain(t, "math")
    (t / "bad.jsonl").write_text('{"id": "x", "prompt": "ok"}\n{not json\n')
    with pytest.raises(TrafficError, match="bad.jsonl:2"):
        load_domain(t, "bad")


def test_traffic_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRAFFIC_ENV, raising=False)
    repo = Path(__file__).resolve().parents[2]
    assert default_traffic_dir() == (repo.parent / "shared" / "data" / "traffic").resolve()
    monkeypatch.setenv(TRAFFIC_ENV, str(tmp_path / "elsewhere"))
    assert default_traffic_dir() == tmp_path / "elsewhere"
    with pytest.raises(TrafficError, match="traffic directory not found.*--traffic"):
        resolve_traffic_dir(None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrafficError, match="no <domain>.jsonl"):
        resolve_traffic_dir(tmp_path / "empty")


def test_pool_is_seeded_and_never_repeats(tmp_path: Path) -> None:
    prompts = load_domain(write_traffic(tmp_path, {"chat": 20}), "chat")
    a = [DomainPool("chat", prompts, 1).take().id for _ in range(1)]
    p1, p2, p3 = (DomainPool("chat", prompts, s) for s in (1, 1, 2))
    s1 = [p1.take().id for _ in range(20)]
    assert s1 == [p2.take().id for _ in range(20)]
    assert s1 != [p3.take().id for _ in range(20)]
    assert sorted(s1) == sorted(p.id for p in prompts) and a[0] == s1[0]
    with pytest.raises(TrafficError, match="ran out of prompts"):
        p1.take()
    pool = DomainPool("chat", prompts, 0)
    got = pool.take(accept=lambda p: p.id.endswith("7"))
    assert got.id == "chat:7" and pool.skipped > 0


def test_plan_mixed_round_robin_warmup_does_not_change_selection(tmp_path: Path) -> None:
    t = write_traffic(tmp_path, {"a": 10, "b": 10})

    def plan(warmup: int):
        return plan_mixed(make_pools(t, ["a", "b"], 0), ["a", "b"], 3, warmup)

    p0, p2 = plan(0), plan(2)
    assert [r.prompt.domain for r in p2.requests] == ["a", "b"] * 3
    assert [r.prompt.id for r in p0.requests] == [r.prompt.id for r in p2.requests]
    assert [r.prompt.domain for r in p2.warmup] == ["a", "b"]
    ids = [r.prompt.id for r in p2.requests + p2.warmup]
    assert len(set(ids)) == len(ids)  # warm-up never reuses a measured prompt
    assert p2.mode == "mixed" and [(s.domain, s.count) for s in p2.segments] == [("a", 3), ("b", 3)]


def test_streams(tmp_path: Path) -> None:
    assert [(s.domain, s.count) for s in parse_stream("chat:2, code:3")] == [("chat", 2),
                                                                              ("code", 3)]
    for bad in ("chat", "chat:x", "chat:0", ":3", ""):
        with pytest.raises(TrafficError):
            parse_stream(bad)
    t = write_traffic(tmp_path, {"a": 10, "b": 10})
    segs = parse_stream("a:3,b:2,a:3")
    plan = plan_stream(make_pools(t, ["a", "b"], 0), segs, 1)
    assert [r.prompt.domain for r in plan.requests] == list("aaabbaaa")
    assert [r.segment for r in plan.requests] == [0, 0, 0, 1, 1, 2, 2, 2]
    ids = [r.prompt.id for r in plan.requests + plan.warmup]
    assert len(set(ids)) == len(ids)  # later segments of a domain continue with fresh prompts
    assert plan.warmup[0].prompt.domain == "a" and plan.mode == "stream"


# ---- runner ----------------------------------------------------------------------------------


def test_divergence_and_normalisation() -> None:
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2
    assert normalise_output([5, 6, 2], (2,), 3) == ((5, 6), "stop")  # HF keeps EOS; we drop it
    assert normalise_output([5, 6, 7], (2,), 3) == ((5, 6, 7), "length")
    assert normalise_output([5, 2, 9], (2,), 8) == ((5,), "stop")


class FakeArm:
    def __init__(self, name: str, kind: str, log: list, flip_at: int | None = None) -> None:
        self.name, self.kind, self.log, self.flip_at = name, kind, log, flip_at

    def run(self, prompt_ids, max_tokens, domain, request_id) -> ArmOutput:
        self.log.append(f"{request_id}-{self.name}")
        toks = [t + 1 for t in prompt_ids][:max_tokens]
        if self.flip_at is not None and len(toks) > self.flip_at:
            toks[self.flip_at] = -1
        return ArmOutput(tuple(toks), "length", len(prompt_ids), len(toks) - 1, 0.1, 0.01,
                         None if self.kind == "hf" else 1.5, 0)

    def close(self) -> None:
        pass


def _requests(tmp_path: Path, n: int) -> tuple[list[BenchRequest], list[BenchRequest]]:
    t = write_traffic(tmp_path, {"a": 10, "b": 10})
    plan = plan_mixed(make_pools(t, ["a", "b"], 0), ["a", "b"], n, 1)
    mk = [BenchRequest(p, [i, i + 1, i + 2]) for i, p in enumerate(plan.requests)]
    return mk, [BenchRequest(p, [7, 8, 9]) for p in plan.warmup]


def test_run_interleaved_rotates_and_excludes_warmup(tmp_path: Path) -> None:
    log: list[str] = []
    arms = [FakeArm("none", "none", log), FakeArm("ngram", "ngram", log, flip_at=1),
            FakeArm("hf", "hf", log)]
    reqs, warm = _requests(tmp_path, 2)
    seen: list[dict] = []
    out = run_interleaved(arms, reqs, warm, 3, progress=False, on_record=seen.append)
    assert log[:3] == ["warmup-0-none", "warmup-0-ngram", "warmup-0-hf"]
    assert log[3:9] == ["run-0-none", "run-0-ngram", "run-0-hf",
                        "run-1-ngram", "run-1-hf", "run-1-none"]  # rotating order
    # Every arm serves request i under the same id: an online arm's held-out requests (with
    # holdout_blocks off, a hash of the id, flywheel/replay.py) are then the same whatever the
    # arm is called.
    assert {entry.rsplit("-", 1)[0] for entry in log[3:6]} == {"run-0"}
    assert len(out.records) == 12 and seen == out.records and not out.interrupted
    mark_divergence(out, "none")
    by = {(r["arm"], r["index"]): r for r in out.records}
    assert by[("ngram", 0)]["diverged_at"] == 1 and by[("hf", 0)]["diverged_at"] is None
    rec = by[("hf", 3)]
    assert rec["domain"] == "b" and rec["tau"] is None and rec["tokens_per_s"] == 20.0
    for key in ("arm", "index", "domain", "tau", "tokens_per_s", "tokens", "draft_version",
                "token_ids_sha1", "prompt_id", "segment"):
        assert key in rec


# ---- command line: bad input fails before loading anything ------------------------------------


def test_cli_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t = write_traffic(tmp_path / "traffic", {"chat": 3})
    out = tmp_path / "out"
    cases = [
        (["--arms", "none,medusa"], "unknown arm 'medusa'"),
        (["--traffic", str(tmp_path / "nope")], "traffic directory not found"),
        (["--domains", "math"], "unknown domain 'math'"),
        (["--stream", "chat:2", "--domains", "chat"], "--stream replaces"),
        (["--stream", "chat:x"], "bad stream segment"),
        (["--max-tokens", "0"], "--max-tokens must be positive"),
        (["--requests", "0"], "--requests must be positive"),
        (["--load", "0"], "--load is a utilisation in (0, 1]"),
        (["--load", "1.5"], "--load is a utilisation in (0, 1]"),
        (["--trainer-threads", "0"], "--trainer-threads must be >= 1"),
    ]
    for extra, msg in cases:
        argv = ["bench", "--traffic", str(t), "--out", str(out), "--no-progress", *extra]
        if "--traffic" in extra:
            argv = ["bench", "--out", str(out), *extra]
        assert main(argv) == 2, extra
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
    assert not out.exists()


# ---- a tiny random model: engine target-only and transformers generate() agree ----------------


def test_engine_and_hf_arms_agree_on_tiny_model() -> None:
    from aurora_spec.engine.engine import Engine, EngineConfig
    from aurora_spec.models.runner import CacheConfig, TargetRunner
    from aurora_spec.models.transformer import from_hf_model
    from tests.tiny_models import tiny_hf_llama

    hf = tiny_hf_llama(seed=3)
    model = from_hf_model(hf)
    engine = Engine(TargetRunner(model, CacheConfig(1, 256)), None, EngineConfig(calibrate=False))
    stops = (2,)
    arms = [EngineArm("none", "none", engine, stops), HfArm("hf", hf, stops, pad_id=0)]
    gen = torch.Generator().manual_seed(0)
    reqs = [BenchRequest(planned(i), torch.randint(3, 96, (6 + i,), generator=gen).tolist())
            for i in range(4)]
    out = run_interleaved(arms, reqs, [], 12, progress=False, save_ids=True)
    mark_divergence(out, "none")
    hf_recs = [r for r in out.records if r["arm"] == "hf"]
    assert all(r["diverged_at"] is None for r in hf_recs)
    for r in out.records:
        assert 2 not in r["token_ids"] and r["tokens"] == len(r["token_ids"])
        assert r["finish_reason"] in ("stop", "length")


def test_records_show_the_draft_length_policy_at_each_requests_start_and_end() -> None:
    """Why a request drafted what it drafted: its record carries the policy's estimates, costs
    and chosen length when it started and when it ended; the global estimates (the next
    request's start) learn from the finished request."""
    from aurora_spec.drafters.eagle3 import Eagle3Drafter
    from aurora_spec.engine.engine import Engine, EngineConfig
    from aurora_spec.models.runner import CacheConfig, TargetRunner
    from tests.tiny_models import head_for, tiny_target

    model, _ = tiny_target("llama", seed=4)
    drafter = Eagle3Drafter(head_for(model, seed=0), model.embed.weight)
    engine = Engine(TargetRunner(model, CacheConfig(1, 256)), drafter,
                    EngineConfig(calibrate=False))
    target_only = Engine(TargetRunner(model, CacheConfig(1, 256)), None,
                         EngineConfig(calibrate=False))
    arms = [EngineArm("none", "none", target_only, ()), EngineArm("head", "static", engine, ())]
    reqs = [BenchRequest(planned(i), [5, 6, 7, 8] * 3) for i in range(2)]
    out = run_interleaved(arms, reqs, [], 24, progress=False)
    by = {(r["arm"], r["index"]): r for r in out.records}
    assert "policy" not in by[("none", 0)]
    first, second = by[("head", 0)]["policy"], by[("head", 1)]["policy"]
    assert set(first) == {"start", "end"}
    assert set(first["start"]) == {"alpha", "draft_ms", "verify_ms", "best_length",
                                   "probe_interval"}
    assert first["start"]["alpha"] == [0.5, 0.5, 0.5]  # the prior: nothing measured yet
    one, depth1, depth2 = first["end"]["verify_ms"]  # as priced: more tokens never cost less
    assert 0 < one <= depth1 <= depth2
    assert first["end"]["alpha"] != first["start"]["alpha"]  # a random head: rejections
    # The second request starts from the global estimates, moved by the first by one request's
    # weight (0.1 at most), not all the way to the first request's own estimates.
    moved = [abs(a - b) for a, b in zip(second["start"]["alpha"], first["start"]["alpha"],
                                        strict=True)]
    assert 0 < max(moved) <= 0.1 * 0.5 + 1e-3


def test_online_arm_at_partial_load_leaves_the_trainer_idle_time() -> None:
    """--load 0.25: after each request the arm waits 3x the request's time with its learner
    resumed (serving idle), then pauses it."""
    import time

    from aurora_spec.bench.online import OnlineArm
    from aurora_spec.drafters.eagle3 import Eagle3Drafter
    from aurora_spec.engine.engine import Engine, EngineConfig
    from aurora_spec.flywheel.learner import OnlineLearner
    from aurora_spec.models.runner import CacheConfig, TargetRunner
    from tests.tiny_models import head_for, tiny_target

    model, _ = tiny_target("llama", seed=4)
    drafter = Eagle3Drafter(head_for(model, seed=0), model.embed.weight)
    engine = Engine(TargetRunner(model, CacheConfig(1, 256)), drafter,
                    EngineConfig(calibrate=False))
    learner = OnlineLearner(model, engine)
    arm = OnlineArm(EngineArm("online", "online", engine, (2,)), learner, load=0.25)
    t0 = time.perf_counter()
    out = arm.run([5, 6, 7, 8] * 4, 24, "chat", "r0")
    wall = time.perf_counter() - t0
    served = out.decode_s + out.prefill_s
    assert out.token_ids and learner.paused
    assert wall >= 4 * served, (wall, served)  # sleep never returns early
    assert out.trainer is None  # no trainer started: nothing heard from one to record


def test_engine_counts_steps_per_thread_count() -> None:
    """GenerationStats.steps_by_threads: every verify step under the thread count it ran on,
    also when the count changes mid-request (a trainer starting or stopping)."""
    import torch

    from aurora_spec.engine.engine import Engine, EngineConfig
    from aurora_spec.models.runner import CacheConfig, TargetRunner
    from aurora_spec.types import SamplingParams
    from tests.tiny_models import tiny_target

    model, _ = tiny_target()
    engine = Engine(TargetRunner(model, CacheConfig(1, 64)), None, EngineConfig(calibrate=False))
    outer = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        seq = engine.add_request([1, 2, 3], SamplingParams(max_tokens=6))
        engine.step()  # prefill and the first verify step
        engine.step()
        torch.set_num_threads(1)
        while not seq.finished:
            engine.step()
    finally:
        torch.set_num_threads(outer)
    assert seq.stats.steps_by_threads == {2: 2, 1: seq.stats.verify_steps - 2}
