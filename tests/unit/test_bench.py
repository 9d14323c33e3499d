"""aurora bench without the bundled model: traffic selection and streams, the interleaved runner
(fake arms), divergence, aggregation, checks and report files; one tiny-model engine-vs-hf run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aurora_spec.bench import plots, report, stream_report
from aurora_spec.bench.arms import (
    ArmOutput,
    ArmSpec,
    BenchError,
    EngineArm,
    HfArm,
    first_divergence,
    normalise_output,
    parse_arms,
)
from aurora_spec.bench.runner import (
    BenchRequest,
    mark_divergence,
    pick_reference,
    run_interleaved,
)
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


def test_parse_arms() -> None:
    specs = parse_arms("none,ngram,eagle3:/tmp/head,hf")
    assert [(s.name, s.kind, s.arg) for s in specs] == [
        ("none", "none", None), ("ngram", "ngram", None), ("eagle3:/tmp/head", "eagle3", "/tmp/head"),
        ("hf", "hf", None)]
    assert pick_reference(specs) == "none"
    assert pick_reference(parse_arms("ngram,hf")) == "hf"
    with pytest.raises(BenchError, match="unknown arm 'medusa'"):
        parse_arms("none,medusa")
    with pytest.raises(BenchError, match="twice"):
        parse_arms("none,none")
    trees = parse_arms("eagle3,eagle3@w3,static:/tmp/h@w2")
    assert [(s.name, s.kind, s.arg, s.tree_width) for s in trees] == [
        ("eagle3", "eagle3", None, None), ("eagle3@w3", "eagle3", None, 3),
        ("static:/tmp/h@w2", "static", "/tmp/h", 2)]
    with pytest.raises(BenchError, match="number after @w must be >= 1"):
        parse_arms("eagle3@w0")
    lookups = parse_arms("eagle3@nolookup,eagle3@w2@lookup,static:/tmp/h@nolookup@w1,eagle3")
    assert [(s.kind, s.arg, s.tree_width, s.lookup) for s in lookups] == [
        ("eagle3", None, None, False), ("eagle3", None, 2, True), ("static", "/tmp/h", 1, False),
        ("eagle3", None, None, None)]
    with pytest.raises(BenchError, match="unknown arm"):
        parse_arms("eagle3@lookups")
    idle = parse_arms("online@idle,online-from:/tmp/h@w2@idle,online,online-from:/tmp/h@share")
    assert [(s.name, s.kind, s.arg, s.tree_width, s.trainer_idle) for s in idle] == [
        ("online@idle", "online", None, None, True),
        ("online-from:/tmp/h@w2@idle", "online-from", "/tmp/h", 2, True),
        ("online", "online", None, None, None),  # auto: the learner decides from the head
        ("online-from:/tmp/h@share", "online-from", "/tmp/h", None, False)]
    with pytest.raises(BenchError, match="@idle, @share, @tN, @rest, @norest, @paired, "
                                         "@unpaired, @spin, @nospin, @heap, @mmap, @trainer.*, @trace.*, @shiftgate, "
                                         "@noshiftgate, @hN and @rN are for online arms"):
        parse_arms("static:/tmp/h@idle")
    with pytest.raises(BenchError, match="are for online arms"):
        parse_arms("eagle3@share")
    with pytest.raises(BenchError, match="are for online arms"):
        parse_arms("static:/tmp/h@norest")
    with pytest.raises(BenchError, match="are for online arms"):
        parse_arms("static:/tmp/h@unpaired")
    paired = parse_arms("online-from:/tmp/h@idle@unpaired,online@paired,online")
    assert [s.rollback_paired for s in paired] == [False, True, None]
    rests = parse_arms("online-from:/tmp/h@idle@norest,online@rest@t1,online@idle")
    assert [(s.arg, s.trainer_idle, s.trainer_threads, s.trainer_rests) for s in rests] == [
        ("/tmp/h", True, None, False), (None, None, 1, True), (None, True, None, None)]
    threads = parse_arms("online-from:/tmp/h@idle@t1,online@t2@w3")
    assert [(s.arg, s.trainer_idle, s.trainer_threads, s.tree_width) for s in threads] == [
        ("/tmp/h", True, 1, None), (None, None, 2, 3)]
    with pytest.raises(BenchError, match="are for online arms"):
        parse_arms("static:/tmp/h@t2")
    with pytest.raises(BenchError, match="number after @t must be >= 1"):
        parse_arms("online@t0")
    gates = parse_arms("online-from:/tmp/h@idle@noshiftgate,online@h4,online@shiftgate,online")
    assert [s.trainer_config for s in gates] == [
        (("gate_shift_positions", 0),), (("holdout_every_shift", 4),),
        (("gate_shift_positions", 256),), None]
    with pytest.raises(BenchError, match="are for online arms"):
        parse_arms("static:/tmp/h@h4")
    ratios = parse_arms("online@r80,online@idle@r0,online")
    assert [s.trainer_config for s in ratios] == [(("recent_ratio", 0.8),),
                                                  (("recent_ratio", 0.0),), None]
    with pytest.raises(BenchError, match="a percentage"):
        parse_arms("online@r101")


def test_arm_suffixes_set_any_trainer_or_trace_field() -> None:
    """``@trainer.FIELD=VALUE`` / ``@trace.FIELD=VALUE`` reach an online arm's configs, typed
    as the field's default; the rightmost of two settings of one field wins."""
    (a,) = parse_arms("online-from:/tmp/h@idle@trainer.lr=0.003@trainer.batch_tokens=128"
                      "@trace.prompt_rows=64@trainer.lr=0.002@shiftgate@trainer.autocast=off"
                      "@trainer.rest_when_trained=false")
    assert (a.kind, a.arg, a.trainer_idle) == ("online-from", "/tmp/h", True)
    assert a.trainer_config == (("autocast", "off"), ("batch_tokens", 128),
                                ("gate_shift_positions", 256), ("lr", 0.002),
                                ("rest_when_trained", False))
    assert a.trace_config == (("prompt_rows", 64),)
    with pytest.raises(BenchError, match="TrainerConfig has no field 'learning_rate'"):
        parse_arms("online@trainer.learning_rate=0.1")
    with pytest.raises(BenchError, match="TrainerConfig.batch_tokens must be of type int \\(got 'big'\\)"):
        parse_arms("online@trainer.batch_tokens=big")
    with pytest.raises(BenchError, match="TrainerConfig.rest_when_trained must be of type bool"):
        parse_arms("online@trainer.rest_when_trained=maybe")
    with pytest.raises(BenchError, match="cannot be set from an arm suffix"):
        parse_arms("online@trainer.depth_weights=1")
    with pytest.raises(BenchError, match="are for online arms"):
        parse_arms("static:/tmp/h@trace.prompt_rows=0")


def _tiny_policy_arm(spec: ArmSpec) -> tuple[EngineArm, EngineArm]:
    """A tiny real target, and an eagle3 arm on it whose policy finds one depth paying and two
    not (frozen estimates, costs growing 1 ms per token)."""
    from aurora_spec.bench.arms import ArmOptions, BenchTarget, build_arm
    from tests.tiny_models import tiny_target

    model, _ = tiny_target("llama", seed=4)
    target = BenchTarget(None, None, model, 256, ())
    opts = ArmOptions(calibrate=False, draft_vocab=64)
    arm, none = (build_arm(target, s, opts) for s in (spec, parse_arms("none")[0]))
    assert isinstance(arm, EngineArm) and isinstance(none, EngineArm)
    policy, costs = arm.engine.policy, arm.engine.costs
    costs.draft_token_s = 1e-9
    costs.times.update({t: 0.03 + 0.001 * t for t in range(1, 40)})
    policy.alpha[:] = [0.9] + [0.01] * (len(policy.alpha) - 1)
    assert policy.best_length(8) == 1
    return arm, none


def _depth_per_step_beside_target_only(arm: EngineArm, none: EngineArm) -> float:
    """Runs three requests on both arms; asserts the arm's outputs equal target-only's and
    returns its proposed tokens per step over the tree width (1.0: one depth every step)."""
    reqs = [BenchRequest(_planned(i), [5, 6, 7, 8, 9][i:] * 3) for i in range(3)]
    out = run_interleaved([none, arm], reqs, [], 24, progress=False, save_ids=True)
    mark_divergence(out, "none")
    drafted = [r for r in out.records if r["arm"] == arm.name]
    assert all(r["diverged_at"] is None for r in drafted)
    steps = sum(r["tokens"] / r["tau"] for r in drafted)
    return sum(r["proposed"] for r in drafted) / (arm.engine.policy.cfg.tree_width * steps)


def test_policy_suffixes_reach_any_engine_arms_draft_length_policy_and_stay_lossless() -> None:
    """``@policy.FIELD=VALUE`` sets a field of an engine arm's PolicyConfig (any arm, not only
    online ones); an arm whose policy drafts one depth and probes a second every other step
    (depth probes) emits what target-only emits."""
    (spec,) = parse_arms("eagle3@nolookup@policy.deep_probe_every=2@policy.ema=0"
                         "@policy.request_ema=0")
    assert spec.policy_config == (("deep_probe_every", 2), ("ema", 0.0), ("request_ema", 0.0))
    with pytest.raises(BenchError, match="PolicyConfig has no field 'depth'"):
        parse_arms("none@policy.depth=2")
    arm, none = _tiny_policy_arm(spec)
    assert arm.engine.policy.cfg.deep_probe_every == 2
    arm.engine.costs.ema = arm.engine.costs.speed_ema = 0.0  # the costs stay as frozen
    assert _depth_per_step_beside_target_only(arm, none) > 1.3  # depth 2 every other step


def test_an_arm_repricing_stale_depths_stays_lossless() -> None:
    """``@policy.reprice_burst``: with every size stale after 2 verifies, the arm keeps drafting
    one depth deeper than its estimates pick to time it again, and emits what target-only
    emits."""
    (spec,) = parse_arms("eagle3@nolookup@policy.reprice_burst=8@policy.ema=0"
                         "@policy.request_ema=0")
    arm, none = _tiny_policy_arm(spec)
    assert arm.engine.policy.cfg.reprice_burst == 8
    arm.engine.costs.stale_after = 2
    assert _depth_per_step_beside_target_only(arm, none) > 1.3


def test_heap_suffixes_set_the_trainers_allocator() -> None:
    """``@heap`` / ``@mmap``: the online arm's trainer keeps large buffers in glibc's heap or
    takes glibc's defaults (LearnerConfig.trainer_heap_buffers); other arms refuse them."""
    heap, mmap, plain = parse_arms("online-from:/tmp/h@idle@heap,online@mmap,online")
    assert (heap.trainer_heap_buffers, mmap.trainer_heap_buffers,
            plain.trainer_heap_buffers) == (True, False, None)
    with pytest.raises(BenchError, match="are for online arms"):
        parse_arms("static:/tmp/h@mmap")


def test_spin_suffixes_set_the_trainers_openmp_wait() -> None:
    """``@spin`` / ``@nospin``: the online arm's trainer threads spin or sleep at barriers
    (LearnerConfig.omp_passive off / on); other arms refuse them."""
    spin, nospin, plain = parse_arms("online-from:/tmp/h@idle@spin,online@nospin,online")
    assert (spin.trainer_spin, nospin.trainer_spin, plain.trainer_spin) == (True, False, None)
    with pytest.raises(BenchError, match="are for online arms"):
        parse_arms("none@spin")


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


# ---- report ----------------------------------------------------------------------------------


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
    reqs = [BenchRequest(_planned(i), torch.randint(3, 96, (6 + i,), generator=gen).tolist())
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
    reqs = [BenchRequest(_planned(i), [5, 6, 7, 8] * 3) for i in range(2)]
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


def _planned(i: int):
    from aurora_spec.bench.traffic import PlannedRequest

    return PlannedRequest(Prompt(f"p{i}", "chat", "test", f"prompt {i}"), 0)


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


def test_none_at_packed_is_the_output_reference() -> None:
    specs = parse_arms("none,none@packed,ngram")
    assert [s.target_kernels for s in specs] == [None, "packed", None]
    with pytest.raises(BenchError, match="@packed is for target-only arms"):
        parse_arms("ngram@packed")

    class _Arm:
        def __init__(self, name: str, kind: str, kernels: str) -> None:
            self.name, self.kind, self.target_kernels = name, kind, kernels

    arms = [_Arm("none", "none", "plain"), _Arm("none@packed", "none", "packed"),
            _Arm("ngram", "ngram", "packed")]
    assert pick_reference(arms) == "none@packed"
    assert pick_reference(arms[:1] + arms[2:]) == "none"
