"""Versioning: lossless swaps mid-generation, corrupt checkpoints refused, rollback on a live
acceptance drop, resume from the newest valid checkpoint, the draft-length policy after a swap."""

from __future__ import annotations

import copy
import dataclasses
import logging

import pytest
import torch

from aurora_spec.drafters.eagle3 import Eagle3Drafter
from aurora_spec.drafters.policy import PolicyConfig, per_depth
from aurora_spec.engine.engine import Engine, EngineConfig
from aurora_spec.flywheel.checkpoints import CheckpointStore
from aurora_spec.flywheel.publisher import Publisher
from aurora_spec.models.cpu_linear import packed_kernels_available
from aurora_spec.models.runner import CacheConfig, TargetRunner
from aurora_spec.types import SamplingParams
from tests.flywheel_helpers import collect_windows, make_engine, trained_trainer
from tests.tiny_models import head_for, tiny_target

GREEDY = SamplingParams(max_tokens=40)


def test_swaps_mid_generation_are_lossless(tmp_path):
    model, _ = tiny_target("llama", seed=4)
    base = make_engine(model, None)
    store = CheckpointStore(tmp_path)
    heads = []
    for v in range(1, 6):
        h = head_for(model, std=0.3, seed=v)
        h.version = v
        heads.append(store.save(h))
    drafter = Eagle3Drafter(head_for(model, std=0.3, seed=0), model.embed.weight)
    engine = make_engine(model, drafter)
    pub = Publisher(drafter, engine, model, store)
    prompts = [[5, 6, 7], [40, 41, 3, 9, 10]]
    want = [list(base.generate(p, GREEDY).token_ids) for p in prompts]
    seqs = [engine.add_request(p, GREEDY) for p in prompts]  # two interleaved requests
    steps, versions = 0, set()
    while not all(s.finished for s in seqs):
        engine.step()
        steps += 1
        if steps % 2 == 0 and heads:
            assert pub.offer(str(heads.pop(0))) is not None  # applied before the next step
        for s in seqs:
            versions |= s.stats.draft_versions
    assert [list(s.output) for s in seqs] == want
    assert len(versions) >= 4 and pub.swaps == 5


@pytest.mark.skipif(not packed_kernels_available(), reason="no oneDNN packed linear")
def test_candidates_are_served_with_the_drafters_kernels(tmp_path):
    """runtime.draft_kernels chooses packed copies or F.linear for the draft head by measuring
    both at load; a published candidate must be served the same way, not packed regardless."""
    model, _ = tiny_target("llama", seed=4)
    store = CheckpointStore(tmp_path)
    candidate = head_for(model, seed=1)
    candidate.version = 1
    path = str(store.save(candidate))
    for packed, bf16 in ((False, False), (True, False), (True, True)):
        drafter = Eagle3Drafter(head_for(model, std=0.3), model.embed.weight, cpu_kernels=packed,
                                bf16_weights=bf16)
        assert bool(drafter.head._packed) == packed
        pub = Publisher(drafter, make_engine(model, drafter), model, store)
        head = pub.offer(path)
        assert head is not None and bool(head._packed) == packed
        assert all(c.bf16_weights == bf16 for _, _, c in head._packed.values())


def test_corrupt_checkpoint_is_refused_and_serving_keeps_its_version(tmp_path, caplog):
    model, _ = tiny_target("llama", seed=4)
    drafter = Eagle3Drafter(head_for(model, std=0.3), model.embed.weight)
    engine = make_engine(model, drafter)
    store = CheckpointStore(tmp_path)
    good = head_for(model, seed=1)
    good.version = 1
    pub = Publisher(drafter, engine, model, store)
    assert pub.offer(str(store.save(good))) is not None
    bad = head_for(model, seed=2)
    bad.version = 2
    path = store.save(bad)
    raw = (path / "head.safetensors").read_bytes()
    (path / "head.safetensors").write_bytes(raw[: len(raw) // 2])  # truncated write
    with caplog.at_level(logging.WARNING):
        assert pub.offer(str(path)) is None
    assert "refusing candidate checkpoint" in caplog.text and pub.refused == 1
    out = engine.generate([3, 4, 5], GREEDY)  # serving goes on with version 1
    # (version 0 is the engine's empty proposal when the draft limit is 0 at the very end)
    assert out.stats.draft_versions - {0} == {1} and drafter.head.version == 1
    # An incompatible head (another target) is refused too.
    other, _ = tiny_target("llama", seed=0, vocab=80)
    alien = head_for(other, seed=3, draft_vocab=64)
    alien.version = 3
    assert pub.offer(str(store.save(alien))) is None and drafter.head.version == 1
    # A restart resumes from the newest *valid* checkpoint, logging the refusals.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        head = store.newest_valid(model)
    assert head is not None and head.version == 1
    assert "refusing checkpoint" in caplog.text


class FakeEngine:
    def __init__(self):
        self.actions = []

    def call_between_steps(self, fn):
        self.actions.append(fn)

    def run(self):
        while self.actions:
            self.actions.pop(0)()


def test_rollback_when_live_acceptance_drops(tmp_path):
    model, _ = tiny_target("llama", seed=4)
    drafter = Eagle3Drafter(head_for(model, seed=0), model.embed.weight)
    engine = FakeEngine()
    store = CheckpointStore(tmp_path)
    pub = Publisher(drafter, engine, model, store, min_steps=20, drop=0.25, min_gap=0.1)
    for _ in range(40):
        pub.observe(0, 4, 3)  # version 0: 3 of 4 drafts accepted
    new = head_for(model, seed=1)
    new.version = 1
    pub.offer(str(store.save(new)))
    assert drafter.head.version == 0  # not before the engine's next step
    engine.run()
    assert drafter.head.version == 1
    for _ in range(25):
        pub.observe(1, 4, 1)  # much worse live
    engine.run()
    assert pub.rollbacks == 1 and drafter.head.version == 0 and pub.live_version == 0
    assert not (tmp_path / "v000001").exists() and (tmp_path / "v000001.bad").exists()
    assert store.live_version() == 0
    # A version that holds up is kept.
    better = head_for(model, seed=2)
    better.version = 2
    pub.offer(str(store.save(better)))
    engine.run()
    for _ in range(25):
        pub.observe(2, 4, 3)
    engine.run()
    assert pub.rollbacks == 1 and drafter.head.version == 2


def test_a_suspect_version_is_rolled_back_only_on_a_paired_verdict(tmp_path):
    """With a judge, a live drop makes the new version a suspect: the judge's paired verdict
    decides (keep or roll back); no verdict within verdict_steps, or an undecided one, leaves it
    to the live drop."""
    model, _ = tiny_target("llama", seed=4)
    drafter = Eagle3Drafter(head_for(model, seed=0), model.embed.weight)
    engine = FakeEngine()
    store = CheckpointStore(tmp_path)
    asked = []
    pub = Publisher(drafter, engine, model, store, min_steps=20, drop=0.25, min_gap=0.1,
                    judge=lambda new, prev: asked.append((new, prev)) or True, verdict_steps=10)

    def swap_in_and_drop(version):
        for _ in range(40):
            pub.observe(pub.live_version, 4, 3)
        head = head_for(model, seed=version)
        head.version = version
        pub.offer(str(store.save(head)))
        engine.run()
        for _ in range(20):
            pub.observe(version, 4, 1)  # looks much worse live
        engine.run()

    swap_in_and_drop(1)
    assert asked == [(1, 0)] and pub.rollbacks == 0 and drafter.head.version == 1  # a suspect
    pub.verdict(1, True, "better on the same traffic")
    for _ in range(40):  # kept: no longer watched
        pub.observe(1, 4, 0)
    assert pub.kept == 1 and pub.rollbacks == 0 and drafter.head.version == 1
    pub.verdict(1, False)  # a late or repeated verdict on a version no longer suspect: ignored
    assert pub.rollbacks == 0

    swap_in_and_drop(2)
    assert asked[-1] == (2, 1) and drafter.head.version == 2
    pub.verdict(1, False)  # a verdict about another version changes nothing
    assert drafter.head.version == 2
    pub.verdict(2, False, "worse on the same traffic")
    engine.run()
    assert pub.rollbacks == 1 and drafter.head.version == 1 and 2 in pub.bad_versions

    swap_in_and_drop(3)
    pub.verdict(3, None, "too little fresh traffic")  # undecided: the live drop decides
    engine.run()
    assert pub.rollbacks == 2 and drafter.head.version == 1

    swap_in_and_drop(4)  # no verdict comes: rolled back after verdict_steps more steps
    for _ in range(9):
        pub.observe(4, 4, 1)
    assert drafter.head.version == 4
    pub.observe(4, 4, 1)
    engine.run()
    assert pub.rollbacks == 3 and drafter.head.version == 1

    pub.judge = lambda new, prev: False  # the judge cannot be asked: roll back at once
    swap_in_and_drop(5)
    assert pub.rollbacks == 4 and drafter.head.version == 1


def test_paired_judge_compares_both_heads_on_traffic_neither_trained_on():
    from aurora_spec.flywheel.judge import judge_swap

    model, _, trainer = trained_trainer()
    got = trainer.propose_candidate()  # freezes version 1: windows from now on are unseen
    assert got is not None
    trained = got[0]
    assert not trainer.store.unseen
    worse = head_for(model, std=0.3, seed=9, draft_vocab=64)
    assert judge_swap(trainer, worse, trained).keep is None  # nothing fresh to judge on yet
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 96, (6,), generator=g).tolist() for _ in range(3)]
    # The traffic served after the freeze (a copy serves: serving packs weights for its kernels).
    collect_windows(model, trainer, prompts, copy.deepcopy(trained))
    assert trainer.store.unseen
    down = judge_swap(trainer, worse, trained)
    assert down.keep is False and down.new < down.previous and down.positions >= 16
    up = judge_swap(trainer, trained, worse)
    assert up.keep is True and (up.new, up.previous) == (down.previous, down.new)
    assert "fresh positions" in up.detail
    # A drop within the gate's margin is noise, not a worse head: the new one stays.
    trainer.cfg = dataclasses.replace(trainer.cfg, gate_margin=down.previous - down.new + 0.01)
    assert judge_swap(trainer, worse, trained).keep is True
    trainer.store.unseen_pairs = 40  # bounded: the newest windows are kept
    collect_windows(model, trainer, prompts, copy.deepcopy(trained))
    scored = [w.scored_pairs for w in trainer.store.unseen]
    assert sum(scored) - scored[0] < 40 <= sum(scored) + 40


def test_learner_resumes_from_newest_valid_checkpoint(tmp_path, caplog):
    from aurora_spec.flywheel.config import LearnerConfig
    from aurora_spec.flywheel.learner import OnlineLearner

    model, _ = tiny_target("llama", seed=4)
    store = CheckpointStore(tmp_path)
    for v in (1, 2, 3):
        h = head_for(model, seed=v)
        h.version = v
        store.save(h)
    (tmp_path / "v000003" / "head.json").write_text("{truncated")
    drafter = Eagle3Drafter(head_for(model, seed=0), model.embed.weight)
    engine = make_engine(model, drafter)
    learner = OnlineLearner(model, engine, LearnerConfig(checkpoint_dir=str(tmp_path)))
    with caplog.at_level(logging.WARNING):
        assert learner.resume_from_checkpoints() == 2
    assert "refusing checkpoint" in caplog.text and "v000003" in caplog.text
    engine.generate([3, 4], SamplingParams(max_tokens=4))  # the swap happens between steps
    assert drafter.head.version == 2 and learner.status()["live_version"] == 2


def test_swap_resets_the_draft_length_policy(tmp_path):
    model, _ = tiny_target("llama", seed=4)
    drafter = Eagle3Drafter(head_for(model, seed=0), model.embed.weight)
    runner = TargetRunner(model, CacheConfig(max_slots=2, capacity=256))
    engine = Engine(runner, drafter, EngineConfig(PolicyConfig(max_draft=4), calibrate=False))
    pol = engine.policy
    pol.alpha[:] = [0.0] * 4  # learnt on a useless day-0 head: drafting is off
    pol.probe.interval = 256
    store = CheckpointStore(tmp_path)
    pub = Publisher(drafter, engine, model, store)
    new = head_for(model, seed=1)
    new.version = 1
    pub.offer(str(store.save(new)), alpha=[0.9, 0.7])
    engine.step()  # no requests: only the between-steps action runs
    assert drafter.head.version == 1
    assert pol.alpha == [0.9, 0.7, 0.7, 0.7] and pol.probe.interval == pol.cfg.probe_every
    assert pol.best_length(4) > 0  # drafting is back on
    pub.rollback("test")
    engine.step()
    assert drafter.head.version == 0 and pol.alpha == [0.0] * 4  # version 0's estimates return


def test_a_loaded_head_seeds_the_policy_with_its_heldout_acceptance(tmp_path):
    """A head's held-out per-depth acceptance travels in its manifest: serving it from disk
    (--draft-weights) or resuming it from a checkpoint starts the draft-length policy there, as
    an online swap does, instead of at the generic prior."""
    from aurora_spec.config import DrafterConfig
    from aurora_spec.flywheel.config import LearnerConfig
    from aurora_spec.flywheel.learner import OnlineLearner
    from aurora_spec.runtime import make_drafter

    model, _ = tiny_target("llama", seed=4)
    head = head_for(model, seed=1)
    head.version, head.heldout_alpha = 3, (0.8, 0.6)
    store = CheckpointStore(tmp_path / "ckpt")
    path = store.save(head)
    policy = PolicyConfig(max_draft=4)
    for lookup in (False, True):
        drafter = make_drafter(DrafterConfig("eagle3", draft_weights=str(path), lookup=lookup,
                                             draft_dtype="float32"), model)
        engine = Engine(TargetRunner(model, CacheConfig(max_slots=2, capacity=256)), drafter,
                        EngineConfig(policy, calibrate=False))
        assert engine.policy.alpha == [0.8, 0.6, 0.6, 0.6], lookup
    drafter = Eagle3Drafter(head_for(model, seed=0), model.embed.weight)
    engine = Engine(TargetRunner(model, CacheConfig(max_slots=2, capacity=256)), drafter,
                    EngineConfig(policy, calibrate=False))
    assert engine.policy.alpha == [0.5] * 4  # a head without estimates: the prior
    learner = OnlineLearner(model, engine, LearnerConfig(checkpoint_dir=str(tmp_path / "ckpt")))
    assert learner.resume_from_checkpoints() == 3
    engine.step()  # the swap runs between steps
    assert drafter.head.version == 3 and engine.policy.alpha == [0.8, 0.6, 0.6, 0.6]


def test_a_swap_takes_held_out_rates_only_at_the_width_served(tmp_path):
    """Rates measured at another width than the drafter serves (a checkpoint written under
    another --tree-width, a head fitted as chains) would misprice every draft: a swap to such
    a head, a resumed one included, starts the policy at its generic prior instead."""
    from aurora_spec.config import DrafterConfig
    from aurora_spec.flywheel.config import LearnerConfig
    from aurora_spec.flywheel.learner import OnlineLearner
    from aurora_spec.runtime import make_drafter

    model, _ = tiny_target("llama", seed=4)
    policy = PolicyConfig(max_draft=4)
    for lookup in (False, True):  # the hybrid's head drafts the learned drafter's width
        drafter = make_drafter(DrafterConfig("eagle3", lookup=lookup, draft_dtype="float32",
                                             tree_width=3), model)
        engine = Engine(TargetRunner(model, CacheConfig(max_slots=2, capacity=256)), drafter,
                        EngineConfig(policy, calibrate=False))
        store = CheckpointStore(tmp_path / f"ckpt{lookup}")
        pub = Publisher(drafter, engine, model, store)
        assert pub.head_width == 3, lookup
        prior = per_depth(engine.policy.cfg.prior_alpha, 4)  # a random head's: probe first
        for version, width, seeded in ((1, 3, [0.8, 0.6, 0.6, 0.6]), (2, 1, prior)):
            head = head_for(model, seed=version)
            head.version, head.heldout_alpha, head.heldout_width = version, (0.8, 0.6), width
            pub.swap(head)
            engine.step()  # the swap runs between steps
            assert drafter.head.version == version and engine.policy.alpha == seeded, lookup
        learner = OnlineLearner(model, engine,
                                LearnerConfig(checkpoint_dir=str(tmp_path / f"ckpt{lookup}")))
        store.save(head)  # version 2, chain rates
        assert learner.resume_from_checkpoints() == 2
        engine.step()
        assert engine.policy.alpha == prior, lookup


def test_a_paired_seed_moves_servings_estimates_by_the_gain_on_the_gate_slice(tmp_path):
    """With the live head's rates on the gate's slice beside the candidate's, a swap seeds the
    policy with what serving measured for the live head plus the candidate's gain there (per
    depth, kept within [0.01, 0.99]), but only as far as serving's figure is a measurement:
    the share still its seed (a depth never drafted) takes the candidate's rate as it is.
    Without the live head's rates, the candidate's rates as they are."""
    from aurora_spec.flywheel.publisher import paired_seed

    measured = [(1.0, 0.34), (1.0, 0.2), (1.0, 0.2)]  # (weight w, w * mean), as measured()
    assert paired_seed([0.14, 0.1], [0.12, 0.3], measured) == pytest.approx([0.36, 0.01, 0.01])
    assert paired_seed([0.9], [0.5], [(1.0, 0.9)]) == [0.99]
    assert paired_seed([0.2, 0.4], [0.1, 0.1], [(1.0, 0.3), (0.0, 0.0)]) == pytest.approx(
        [0.4, 0.4])  # depth 2: nothing measured, the candidate's rate
    assert paired_seed([0.2], [0.1], [(0.5, 0.2)]) == pytest.approx([0.5 * 0.2 + 0.5 * 0.5])
    model, _ = tiny_target("llama", seed=4)
    drafter = Eagle3Drafter(head_for(model, seed=0), model.embed.weight)
    engine = Engine(TargetRunner(model, CacheConfig(max_slots=2, capacity=256)), drafter,
                    EngineConfig(PolicyConfig(max_draft=4), calibrate=False))
    engine.policy.alpha[:] = [0.34, 0.3, 0.25, 0.2]  # what serving measured for version 0 ...
    engine.policy.seed_weight[:] = [0.0, 0.0, 0.0, 1.0]  # ... at depths 1-3, not at 4
    engine.policy.seed[3] = 0.2
    store = CheckpointStore(tmp_path)
    pub = Publisher(drafter, engine, model, store)
    for version, live_alpha, seeded in (
            (1, [0.12, 0.1], [0.36, 0.32, 0.27, 0.12]),  # paired: 0.34 + (0.14 - 0.12) ...
            (2, None, [0.14, 0.12, 0.12, 0.12]),  # the candidate's rates as they are
            (3, [0.1], [0.14, 0.12, 0.12, 0.12])):  # nothing measured for version 2 yet
        head = head_for(model, seed=version)
        head.version = version
        pub.offer(str(store.save(head)), alpha=[0.14, 0.12], live_alpha=live_alpha)
        engine.step()  # the swap runs between steps
        assert drafter.head.version == version
        assert engine.policy.alpha == pytest.approx(seeded), version
        assert engine.policy.seed_weight == [1.0] * 4, version
