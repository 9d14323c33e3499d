"""aurora bench arm specs: parsing --arms names and their @suffixes (tree width, lookup, online
trainer settings, @trainer./@trace./@policy. field overrides, @packed) into ArmSpecs, the
reference arm picked from them, and that policy suffixes reach a tiny engine arm and stay
lossless."""

from __future__ import annotations

import pytest

from aurora_spec.bench.arms import ArmSpec, BenchError, EngineArm, parse_arms
from aurora_spec.bench.runner import (
    BenchRequest,
    mark_divergence,
    pick_reference,
    run_interleaved,
)
from tests.bench_helpers import planned


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
    narrow = parse_arms("online@narrow,static:/tmp/h@wide@w3,online")
    assert [(s.kind, s.tree_width, s.lookup_narrow) for s in narrow] == [
        ("online", None, True), ("static", 3, False), ("online", None, None)]
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
    reqs = [BenchRequest(planned(i), [5, 6, 7, 8, 9][i:] * 3) for i in range(3)]
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
