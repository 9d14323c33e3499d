"""The trainer's side of versioning: the gate refuses a worse candidate and holds out whole
requests, the trainer rests and wakes, the replay reservoir, vocabulary rebuilds, shifts."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from aurora_spec.flywheel.config import TrainerConfig
from aurora_spec.flywheel.losses import Embedder, TargetHead
from aurora_spec.flywheel.shift import ShiftWatch
from aurora_spec.flywheel.trainer import Trainer
from tests.flywheel_helpers import collect_windows, trained_trainer
from tests.tiny_models import head_for, tiny_target


def test_gate_refuses_a_worse_candidate():
    model, _, trainer = trained_trainer()
    got = trainer.propose_candidate()  # better than the day-0 head: published
    assert got is not None and got[0].version == 1 and got[1].candidate > got[1].live
    trainer.set_live(got[0])
    worse = head_for(model, std=0.3, seed=9, draft_vocab=64)  # a random head
    trainer.head = worse
    assert trainer.propose_candidate() is None
    assert trainer.stats.last_gate["passed"] is False
    assert trainer.stats.last_gate["candidate"] < trainer.stats.last_gate["live"]
    assert trainer.next_version == 2  # refused candidates consume no version
    # The per-depth estimates (they seed serving's draft-length policy) are smoothed: a random
    # head whose chains never get deep still gets a non-zero estimate at every depth.
    assert len(trainer.last_alpha) == trainer.cfg.gate_depth
    assert all(0.0 < a < 1.0 for a in trainer.last_alpha), trainer.last_alpha


def test_a_passed_gate_carries_both_heads_rates_on_its_slice():
    """A candidate that passes brings its own per-depth rates and the live head's on the same
    slice (what a paired policy seed needs): each the rates scoring that head alone gives."""
    _, _, trainer = trained_trainer()
    got = trainer.propose_candidate()
    assert got is not None
    cand, res = got
    windows = trainer.gate_windows()
    trainer.offline_acceptance(trainer.live, windows)
    assert res.live_alpha == [round(a, 4) for a in trainer.last_alpha]
    trainer.offline_acceptance(cand, windows)
    assert res.alpha == [round(a, 4) for a in trainer.last_alpha]
    assert res.alpha != res.live_alpha and len(res.live_alpha) == trainer.cfg.gate_depth


def test_prequential_gate_judges_a_frozen_candidate_on_the_traffic_after_it():
    """With gate_prequential a candidate is frozen first and judged later, against the live
    head, on the windows that arrived after it was frozen (all of them, held out or not); it is
    published if it passes, a worse one is refused, and training goes on meanwhile."""
    model, head, trainer = trained_trainer(gate_prequential=True, gate_positions=64)
    g = torch.Generator().manual_seed(0)  # the stream it trained on, again
    prompts = [torch.randint(3, 96, (6,), generator=g).tolist() for _ in range(3)]
    assert trainer.propose_candidate() is None  # frozen; what came before it does not count
    good = trainer.fresh.candidate
    assert good is not None and trainer.fresh.scored == 0 and trainer.stats.gates == 0
    trainer.train_step()  # the weights train on; the frozen copy does not move
    assert not torch.equal(good.fc.weight, trainer.head.fc.weight)
    assert trainer.propose_candidate() is None and trainer.fresh.candidate is good  # filling
    collect_windows(model, trainer, prompts, head)
    assert trainer.fresh.ready
    assert any(not trainer.store.held_out(w.request_id) for w in trainer.fresh.windows)
    trainer.head = head_for(model, std=0.3, seed=9, draft_vocab=64)  # worse weights from here
    got = trainer.propose_candidate()  # judges `good` (beats the day-0 live head): published
    assert got is not None and got[0] is good and got[0].version == 1
    assert got[1].positions >= 64 and got[1].candidate > got[1].live
    worse = trainer.fresh.candidate  # frozen from the worse weights, judged on the next slice
    assert worse is not None and worse is not good and trainer.fresh.scored == 0
    trainer.set_live(good)
    collect_windows(model, trainer, prompts, head)
    assert trainer.propose_candidate() is None
    gate = trainer.stats.last_gate
    assert gate["passed"] is False and gate["candidate"] < gate["live"] and gate["positions"] >= 64
    assert trainer.next_version == 2 and trainer.stats.gates == 2


def test_trainer_rests_when_nothing_beats_live_and_wakes_on_new_evidence():
    """After rest_after_rejections judged gates in a row without a better candidate the trainer
    stops stepping (its core goes to serving); a drop of the live head's held-out acceptance,
    a fall of the vocabulary's coverage or enough new windows wake it, and each rest without a
    passed gate in between lasts twice as many windows."""
    model, head, trainer = trained_trainer(rest_after_rejections=2, rest_min_windows=10_000,
                                           rest_max_windows=10_000, vocab_rebuild_coverage=0.0,
                                           rest_wake_coverage=0.0, probe_publish_every=5)
    cfg = trainer.cfg
    got = trainer.propose_candidate()
    assert got is not None
    trainer.set_live(got[0])
    trainer.head = head_for(model, std=0.3, seed=9, draft_vocab=64)  # never beats live
    assert trainer.propose_candidate() is None and not trainer.maybe_rest()  # 1 in a row
    assert trainer.propose_candidate() is None and trainer.maybe_rest()  # 2: rests
    st = trainer.status()
    assert st["resting"] and st["rests"] == 1 and not trainer.maybe_wake()  # nothing new yet
    # The live head's acceptance on requests held out since the rest falls (new traffic it is
    # bad at) by rest_wake_drop of its level at rest: it wakes.
    trainer.cfg = dataclasses.replace(cfg, gate_positions=16)
    trainer._rest_level = st["last_gate"]["live"] + 1.0
    collect_windows(model, trainer, [[7, 8, 9, 10]] * 6, head)  # some requests are held out
    assert trainer.maybe_wake() and not trainer.resting
    assert trainer.status()["wakes"] == 1 and "held-out" in trainer.status()["last_wake"]
    assert trainer.steps_before_gate == cfg.publish_every  # evidence of new traffic: no probe
    # Rest again, now for twice the windows (no candidate passed since the first rest); enough
    # new training windows wake it whatever the held-out slice says.
    trainer.cfg = dataclasses.replace(cfg, rest_min_windows=3)
    assert trainer.propose_candidate() is None and trainer.propose_candidate() is None
    assert trainer.maybe_rest() and trainer.status()["rest_windows"] == 6
    trainer.cfg = dataclasses.replace(trainer.cfg, rest_max_windows=5)  # the cap
    assert trainer.rest_windows == 5
    collect_windows(model, trainer, [[11, 12, 13, 14, 15]] * 9, head)
    assert trainer.maybe_wake() and "new training windows" in trainer.status()["last_wake"]
    assert trainer.steps_before_gate == 5  # a probe judges its first candidate sooner
    # A third rest; the draft vocabulary covering less than rest_wake_coverage of the tokens
    # emitted since the rest (once rest_coverage_tokens of them came) wakes it.
    assert trainer.propose_candidate() is None and trainer.propose_candidate() is None
    assert trainer.maybe_rest() and not trainer.maybe_wake()
    assert trainer.steps_before_gate == cfg.publish_every  # resting: not probing
    trainer.cfg = dataclasses.replace(trainer.cfg, rest_wake_coverage=1.01,
                                      rest_coverage_tokens=40)
    assert not trainer.maybe_wake()  # nothing emitted since the rest: nothing to judge on
    # (the rule before, kept for side-by-side runs, judges the recent window: it wakes now)
    trainer.cfg = dataclasses.replace(trainer.cfg, rest_coverage_since_rest=False)
    assert trainer.maybe_wake() and "fell to" in trainer.status()["last_wake"]
    assert trainer.propose_candidate() is None and trainer.maybe_rest()
    trainer.cfg = dataclasses.replace(trainer.cfg, rest_coverage_since_rest=True)
    assert not trainer.maybe_wake()
    collect_windows(model, trainer, [[16, 17, 18]], head)  # one request: 48 tokens, 2 windows
    assert trainer.maybe_wake() and "since the rest" in trainer.status()["last_wake"]
    # ... a probe (rest_coverage_probe): one gate without a better candidate and it rests again;
    # without it a coverage wake is evidence of new traffic and needs rest_after_rejections.
    assert trainer.propose_candidate() is None and trainer.maybe_rest()
    trainer.cfg = dataclasses.replace(trainer.cfg, rest_coverage_probe=False)
    assert not trainer.maybe_wake()  # the tokens before this rest do not count
    collect_windows(model, trainer, [[19, 20, 21]], head)
    assert trainer.maybe_wake() and "coverage" in trainer.status()["last_wake"]
    assert trainer.steps_before_gate == cfg.publish_every  # evidence of new tokens: no probe
    assert trainer.propose_candidate() is None and not trainer.maybe_rest()
    assert trainer.propose_candidate() is None and trainer.maybe_rest()
    collect_windows(model, trainer, [[22, 23, 24]], head)
    assert trainer.maybe_wake()
    # A candidate that passes resets the backoff (with probe_progress_rewind 0; see the next test
    # for a probe that probes on).
    trainer.cfg = dataclasses.replace(trainer.cfg, probe_progress_rewind=0)
    trainer.head = copy.deepcopy(got[0]).train()
    trainer.set_live(head_for(model, std=0.3, seed=9, draft_vocab=64))
    trainer.probing = True  # as after a probe's wake
    assert trainer.steps_before_gate == 5
    assert trainer.propose_candidate() is not None and trainer.rest_windows == 3
    assert trainer.steps_before_gate == cfg.publish_every  # progress ends the probe


def test_a_probe_that_finds_progress_probes_on_with_probe_progress_rewind():
    """With probe_progress_rewind a probe's gate with progress publishes the candidate and
    takes that many doublings off the backoff; the probe goes on, one gate without progress
    ends it, and the rest after it is shorter than the last. A wake on evidence of new traffic
    (here held-out acceptance) is no probe: its progress starts the backoff over."""
    model, head, trainer = trained_trainer(rest_after_rejections=2, rest_min_windows=2,
                                           rest_max_windows=10_000, vocab_rebuild_coverage=0.0,
                                           rest_wake_coverage=0.0)  # probe_progress_rewind 1
    good = trainer.propose_candidate()
    assert good is not None
    random = head_for(model, std=0.3, seed=9, draft_vocab=64)
    trainer.set_live(random)
    trainer.head = copy.deepcopy(random).train()  # never beats live
    for n in range(1, 4):  # three rests without a pass: 2, 4, 8 windows
        assert trainer.propose_candidate() is None
        while not trainer.maybe_rest():
            assert trainer.propose_candidate() is None
        assert trainer.rest_windows == 2 << (n - 1)
        collect_windows(model, trainer, [[11, 12, 13, 14, 15]] * (2 << n), head)
        assert trainer.maybe_wake() and trainer.probing
    trainer.head = copy.deepcopy(good[0]).train()  # the probe finds a better head
    assert trainer.propose_candidate() is not None
    st = trainer.status()
    assert st["probe_progress"] == 1 and trainer.probing and trainer.stats.rests_since_pass == 2
    trainer.set_live(good[0])  # the swap
    trainer.head = copy.deepcopy(random).train()
    assert trainer.propose_candidate() is None and trainer.maybe_rest()  # one gate ends it
    assert trainer.rest_windows == 8  # as long as the rest before the probe, not 16
    # A wake on held-out evidence: progress after it starts the backoff over.
    trainer._rest_level = 10.0
    trainer.cfg = dataclasses.replace(trainer.cfg, gate_positions=16)
    collect_windows(model, trainer, [[7, 8, 9, 10]] * 6, head)
    assert trainer.maybe_wake() and not trainer.probing
    assert "held-out" in trainer.status()["last_wake"]
    trainer.cfg = dataclasses.replace(trainer.cfg, gate_positions=512)  # judge on all of it
    trainer.set_live(random)
    trainer.head = copy.deepcopy(good[0]).train()
    assert trainer.propose_candidate() is not None and trainer.stats.rests_since_pass == 0
    assert trainer.status()["probe_progress"] == 1


def test_a_pass_by_less_than_rest_progress_is_published_but_is_no_progress():
    """A candidate the gate passes goes live; whether it keeps the trainer training depends on
    by how much it beats the live head (rest_progress: a share of the live head's acceptance).
    A gate margin below zero lets a copy of the live head pass: a pass with no gain at all."""
    for progress, rests in ((0.10, True), (0.0, False)):
        _, _, trainer = trained_trainer(rest_after_rejections=1, gate_margin=-1.0,
                                        rest_progress=progress)
        first = trainer.propose_candidate()  # beats the day-0 head (acceptance 0): progress
        assert first is not None and trainer.stats.gates_without_progress == 0
        trainer.set_live(first[0])
        trainer.head = copy.deepcopy(first[0]).train()
        again = trainer.propose_candidate()
        assert again is not None and again[0].version == 2  # published either way ...
        assert again[1].candidate == pytest.approx(again[1].live)
        assert trainer.maybe_rest() is rests  # ... but only progress keeps it training


def test_gate_half_life_weighs_the_newest_held_out_windows_most():
    """With gate_half_life h the gate's score is the mean over its slice's draft points with a
    window k places older than the newest weighing 0.5 ** (k / h): the same as scoring each
    window alone and weighting by hand; without it, the plain mean over the slice."""
    _, _, trainer = trained_trainer(gate_positions=10_000)
    head = trainer.frozen_candidate()
    windows = trainer.gate_windows()  # newest first
    alone = [trainer.offline_acceptance(head, [w]) for w in windows]
    scored = [(acc * n, n) for acc, n in alone if n]
    assert len(scored) >= 3 and len({round(t / n, 4) for t, n in scored}) > 1
    plain, n = trainer.gate_acceptance(head, windows)
    assert n == sum(n for _, n in scored)
    assert plain == pytest.approx(sum(t for t, _ in scored) / n, abs=1e-6)
    trainer.cfg = dataclasses.replace(trainer.cfg, gate_half_life=1.0)
    weights = [0.5 ** k for k in range(len(windows))]
    by_hand = (sum(w * acc * n for w, (acc, n) in zip(weights, alone))
               / sum(w * n for w, (_, n) in zip(weights, alone)))
    weighted, _ = trainer.gate_acceptance(head, windows)
    assert weighted == pytest.approx(by_hand, abs=1e-6) and weighted != pytest.approx(plain)


def test_trained_head_rests_from_the_start_and_wakes_when_served_acceptance_falls():
    """A head trained before serving starts resting; the live head's own acceptance on all served
    steps (from the traces) sets its level, and a fall of it by rest_wake_drop (the traffic
    shifted) over two windows of rest_wake_steps steps in a row wakes the trainer. A wake on new
    windows alone is a probe: one gate without a better candidate ends it."""
    model, _, fitted = trained_trainer()
    got = fitted.propose_candidate()
    assert got is not None and got[0].version == 1
    trained = got[0]
    cfg = dataclasses.replace(fitted.cfg, rest_wake_steps=24, rest_min_windows=10_000,
                              rest_max_windows=10_000, vocab_rebuild_coverage=0.0,
                              rest_wake_coverage=0.0, gate_positions=10_000)
    trainer = Trainer(trained, TargetHead(model.lm_head.weight), Embedder(model.embed.weight), cfg)
    assert trainer.resting and trainer.status()["rests"] == 1
    g = torch.Generator().manual_seed(0)
    seen = [torch.randint(3, 96, (6,), generator=g).tolist() for _ in range(3)]
    collect_windows(model, trainer, seen * 2, trained)  # the traffic it was fitted on
    level = trainer.status()["served_acceptance"]
    assert not trainer.maybe_wake() and trainer._served_level == level and level > 0.5
    collect_windows(model, trainer, seen, trained)
    assert not trainer.maybe_wake()  # same traffic, same level: still resting
    new = [torch.randint(3, 96, (6,), generator=torch.Generator().manual_seed(s)).tolist()
           for s in range(10, 13)]
    collect_windows(model, trainer, new, trained)  # traffic it has never seen
    assert trainer.status()["served_acceptance"] < 0.75 * level
    assert not trainer.maybe_wake()  # a fall in one window: confirmed on the next
    collect_windows(model, trainer, seen, trained)  # ... where it is back: noise
    assert not trainer.maybe_wake() and not trainer._served_drop_seen
    collect_windows(model, trainer, new, trained)
    assert not trainer.maybe_wake()
    collect_windows(model, trainer, new, trained)  # still fallen: the traffic shifted
    assert trainer.maybe_wake() and "served acceptance" in trainer.status()["last_wake"]
    # Evidence of a shift: rest only after rest_after_rejections (2) gates without a pass.
    trainer.head = head_for(model, std=0.3, seed=9, draft_vocab=64)  # never beats live
    assert trainer.propose_candidate() is None and not trainer.maybe_rest()
    assert trainer.propose_candidate() is None and trainer.maybe_rest()
    # A wake on new windows only: one rejected gate and it rests again.
    trainer.cfg = dataclasses.replace(cfg, rest_min_windows=2, rest_wake_steps=0)
    collect_windows(model, trainer, new, trained)
    assert trainer.maybe_wake() and "new training windows" in trainer.status()["last_wake"]
    assert trainer.propose_candidate() is None and trainer.maybe_rest()
    # A day-0 head (version 0) starts training.
    assert not Trainer(head_for(model, draft_vocab=64), TargetHead(model.lm_head.weight),
                       Embedder(model.embed.weight), cfg).resting


def test_vocab_coverage_is_not_reported_before_any_emitted_token():
    """Coverage of nothing is no figure: /metrics skips the gauge rather than show 1.0."""
    model, _ = tiny_target("llama", seed=0)
    fresh = Trainer(head_for(model, draft_vocab=64), TargetHead(model.lm_head.weight),
                    Embedder(model.embed.weight), TrainerConfig())
    assert fresh.status()["vocab_coverage"] is None
    _, _, trainer = trained_trainer()
    assert 0.0 < trainer.status()["vocab_coverage"] <= 1.0


def test_a_head_trained_before_serving_learns_at_lr_trained():
    """A day-0 head learns at ``lr``; one trained before serving (version > 0) at ``lr_trained``,
    through vocabulary rebuilds and restarts; None keeps ``lr`` for both."""
    model, _ = tiny_target("llama", seed=0)
    day0 = head_for(model, draft_vocab=64)
    trained = copy.deepcopy(day0)
    trained.version = 3
    cfg = TrainerConfig(lr=1e-3, lr_trained=2e-4)

    def lr(head, c=cfg):
        t = Trainer(head, TargetHead(model.lm_head.weight), Embedder(model.embed.weight), c)
        return t, t.opt.param_groups[0]["lr"]

    assert lr(day0)[1] == 1e-3
    trainer, got = lr(trained)
    assert got == 2e-4
    trainer.restart_from(day0)  # a rollback keeps the trainer's rate
    assert trainer.opt.param_groups[0]["lr"] == 2e-4
    trainer._make_optimizer({})  # as a vocabulary rebuild remakes it
    assert trainer.opt.param_groups[0]["lr"] == 2e-4
    assert lr(trained, dataclasses.replace(cfg, lr_trained=None))[1] == 1e-3


def test_vocab_rebuild_keeps_the_adam_moments_of_kept_rows():
    """Rebuilding the draft vocabulary must not reset what the optimizer learned about the rows
    it keeps: their AdamW moments move with them; new rows start at zero."""
    _, _, trainer = trained_trainer()
    w = trainer.head.lm_head.weight
    before = {k: v.clone() for k, v in trainer.opt.state[w].items()}
    d2t_old = trainer.head.d2t.clone()
    d2t = torch.cat([d2t_old[8:], torch.arange(80, 88)])  # drop 8 tokens, add 8 new ones
    trainer.vocab.maybe_rebuild = lambda t2d: torch.sort(d2t).values
    assert trainer.maybe_rebuild_vocab()
    new_w = trainer.head.lm_head.weight
    state = trainer.opt.state[new_w]
    new_d2t = trainer.head.d2t
    for i, tok in enumerate(new_d2t.tolist()):
        old = (d2t_old == tok).nonzero()
        for k in ("exp_avg", "exp_avg_sq"):
            want = before[k][old[0, 0]] if len(old) else torch.zeros_like(before[k][0])
            assert torch.equal(state[k][i], want), (tok, k)
    assert torch.equal(state["step"], before["step"])
    trainer.vocab.maybe_rebuild = lambda t2d: None
    assert trainer.train_step() is not None  # the optimizer steps with the remapped state
    assert trainer.opt.state[new_w]["step"] == before["step"] + 1


def test_replay_reservoir_keeps_old_domains():
    from aurora_spec.flywheel.batch import Window
    from aurora_spec.flywheel.replay import WindowStore

    store = WindowStore(recent_windows=8, reservoir_windows=100, holdout_every=0, seed=1)
    rows = torch.zeros(5, 8)
    for dom, n in (("a", 300), ("b", 300)):  # a burst of b after a
        for _ in range(n):
            store.add(Window("r", dom, 0, [1] * 6, rows))
    share_a = sum(w.domain == "a" for w in store.reservoir) / len(store.reservoir)
    assert 0.3 < share_a < 0.7  # uniform over all traffic, not just the burst
    assert all(w.domain == "b" for w in store.recent)
    batch = store.sample(pairs=4 * 40, recent_ratio=0.5)
    assert any(w.domain == "a" for w in batch)
    small = WindowStore(reservoir_windows=1000, holdout_every=0, reservoir_bytes=50 * 400)
    for _ in range(200):
        small.add(Window("r", "a", 0, [1] * 6, rows))
    assert len(small.reservoir) <= max(16, small.reservoir_cap) < 200


def test_gate_holds_out_whole_requests():
    """Every window of a held-out request goes to the gate's slice, none to training: windows
    of one request share its prompt, so splitting a request would flatter the gate."""
    from aurora_spec.flywheel.batch import Window
    from aurora_spec.flywheel.replay import WindowStore

    store = WindowStore(recent_windows=10_000, reservoir_windows=10_000, holdout_every=4,
                        holdout_windows=10_000, seed=3)
    rows = torch.zeros(5, 8)
    for i in range(400):
        for _ in range(3):  # three answer windows per request
            store.add(Window(f"req-{i}", "a", 0, [1] * 6, rows))
        store.add(Window(f"req-{i}", "a", 0, [1] * 6, rows, prompt_rows=5))  # prompt only
    held = {w.request_id for w in store.holdout}
    trained = {w.request_id for w in store.reservoir}
    assert not held & trained and len(held | trained) == 400
    assert 0.17 < len(held) / 400 < 0.33  # about 1 in 4
    assert all(sum(w.request_id == r for w in store.holdout) == 3 for r in held)
    assert store.positions == 4 * 4 * len(trained)  # prompt windows of trained requests train
    # A change of rate (after a shift the trainer holds out 1 in 4 instead of 1 in 8) applies to
    # requests that start after it: one already under way stays on its side.
    store.holdout_every = 0  # none held out ...
    store.add(Window("req-new", "a", 0, [1] * 6, rows))
    store.holdout_every = 1  # ... then every new request ...
    store.add(Window("req-new", "a", 0, [1] * 6, rows))
    assert not store.held_out("req-new")  # ... but not the second half of one under way
    assert not any(w.request_id == "req-new" for w in store.holdout)
    assert store.held_out("req-newer") and not store.held_out(sorted(trained)[0])


def test_holdout_blocks_hold_out_one_request_in_every_block_of_arrivals():
    """With holdout_blocks exactly one request of each holdout_every in arrival order is held out
    (whole, as with the hash), at a place that varies from block to block; so the wait for the
    first held-out request after any point is under 2 x holdout_every (the hash: geometric)."""
    from aurora_spec.flywheel.replay import WindowStore

    store = WindowStore(holdout_every=8, seed=3, holdout_blocks=True)
    sides = [store.held_out(f"req-{i}") for i in range(800)]
    assert all(sum(sides[b:b + 8]) == 1 for b in range(0, 800, 8))
    assert len({sides[b:b + 8].index(True) for b in range(0, 800, 8)}) > 4
    held = [i for i, s in enumerate(sides) if s]
    assert max(b - a for a, b in zip(held, held[1:])) < 16
    assert store.held_out("req-0") == sides[0]  # a request keeps its side
    hashed = WindowStore(holdout_every=8, seed=3, holdout_blocks=False)
    gaps = [i for i in range(800) if hashed.held_out(f"req-{i}")]
    assert max(b - a for a, b in zip(gaps, gaps[1:])) >= 16  # what the blocks bound


def test_shift_watch_fires_once_per_fall_below_the_peak():
    watch = ShiftWatch(steps=4, drop=0.25)
    assert not any(watch.observe(a) for a in (2, 2, 2, 2, 3, 3, 3, 3))  # rising: a new peak
    assert watch.peak == 3.0
    fired = [watch.observe(a) for a in (1, 1, 1, 1, 1, 1)]  # 3 -> 2.5 -> 2.0 < 3 * 0.75
    assert fired == [False, True, False, False, False, False] and watch.shifts == 1
    # The fall went on (2.0 -> 1.0) without a second shift: the window restarted at the shift,
    # and its first full mean (1.0, four steps later) is the new peak.
    assert watch.level == 1.0 and watch.peak == 1.0
    assert not watch.observe(0)  # 0.75: not below 1.0 * 0.75
    assert watch.observe(0) and watch.shifts == 2  # 0.5: a second shift
    assert not ShiftWatch(steps=0, drop=0.25).observe(0)  # off


def test_after_a_shift_the_gate_judges_on_traffic_held_out_since():
    """A fall of the served acceptance (any live version) marks a shift: the gate then judges on
    the held-out positions that arrived since (at least gate_shift_positions of them), not on
    the newest gate_positions, which are mostly the old traffic, and more new requests are held
    out (holdout_every_shift); once gate_positions arrived since, it is the usual slice again."""
    model, _, fitted = trained_trainer(rest_wake_steps=24, gate_shift_positions=8,
                                       holdout_every_shift=2)
    got = fitted.propose_candidate()
    assert got is not None
    trained = got[0]
    fitted.set_live(trained)
    g = torch.Generator().manual_seed(0)
    seen = [torch.randint(3, 96, (6,), generator=g).tolist() for _ in range(3)]
    collect_windows(model, fitted, seen * 2, trained)  # the traffic it was trained on
    assert fitted.status()["shifts"] == 0 and fitted.gate_size() == fitted.cfg.gate_positions
    before = len(fitted.gate_windows())
    new = [torch.randint(3, 96, (6,), generator=torch.Generator().manual_seed(s)).tolist()
           for s in range(10, 13)]
    collect_windows(model, fitted, new, trained)  # traffic it has never seen
    st = fitted.status()
    assert st["shifts"] == 1 and 8 <= st["gate_size"] < fitted.cfg.gate_positions
    assert fitted.store.holdout_every == 2  # new requests: 1 in 2 held out (1 in 3 before)
    windows = fitted.gate_windows()
    assert 0 < len(windows) < before
    assert sum(w.scored_pairs for w in windows[:-1]) < st["gate_size"]  # the newest, no more
    fitted.cfg = dataclasses.replace(fitted.cfg, gate_positions=st["gate_size"])
    fitted.flush()  # the check runs as windows arrive
    assert fitted.gate_size() == st["gate_size"] and fitted._shift_mark is None  # judged
    assert fitted.store.holdout_every == 3
