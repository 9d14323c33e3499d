"""Adaptive draft length: follows measured acceptance and measured costs, down to zero."""

from __future__ import annotations

import random

import pytest

from aurora_spec.drafters.policy import CostModel, DraftLengthPolicy, PolicyConfig


def costs(ratio_per_token: float, draft_s: float = 0.0) -> CostModel:
    c = CostModel()
    for t in range(1, 10):
        c.times[t] = 0.030 * (1 + ratio_per_token * (t - 1))
    c.draft_token_s = draft_s
    return c


def trained(policy: DraftLengthPolicy, accepted: int, depth: int, steps: int = 60) -> None:
    for _ in range(steps):
        policy.observe(depth, accepted)


def test_useless_drafter_goes_to_zero_but_keeps_probing() -> None:
    p = DraftLengthPolicy(PolicyConfig(max_draft=8, probe_every=16, probe_length=1), costs(0.1))
    trained(p, accepted=0, depth=4)
    choices = [p.choose(8) for _ in range(64)]
    assert choices.count(0) == 60 and choices.count(1) == 4  # one cheap probe every 16 steps


def test_good_drafter_with_cheap_verify_drafts_long() -> None:
    p = DraftLengthPolicy(PolicyConfig(max_draft=8), costs(0.02))
    trained(p, accepted=8, depth=8)
    assert p.choose(8) == 8
    assert p.choose(3) == 3  # the limit (remaining tokens, context) is respected


def test_expensive_verify_shortens_drafts() -> None:
    cheap = DraftLengthPolicy(PolicyConfig(max_draft=8), costs(0.02))
    dear = DraftLengthPolicy(PolicyConfig(max_draft=8), costs(0.5))
    for p in (cheap, dear):
        p.alpha = [0.7] * 8
    assert 0 < dear.choose(8) < cheap.choose(8)


def test_draft_cost_counts() -> None:
    free = DraftLengthPolicy(PolicyConfig(max_draft=8), costs(0.05, draft_s=0.0))
    slow = DraftLengthPolicy(PolicyConfig(max_draft=8), costs(0.05, draft_s=0.02))
    for p in (free, slow):
        p.alpha = [0.6] * 8
    assert slow.choose(8) < free.choose(8)


def test_trees_are_priced_by_the_nodes_they_verify() -> None:
    """A top-3 tree of depth k verifies 3k + 1 tokens: with 1-4 tokens costing the same (the CPU
    kernels) and more costing more, a tree stays shallow where a chain would go deep."""
    c = CostModel()
    for t in range(1, 30):
        c.times[t] = 0.030 if t <= 4 else 0.030 * (1 + 0.1 * (t - 4))
    chain = DraftLengthPolicy(PolicyConfig(max_draft=8), c)
    tree = DraftLengthPolicy(PolicyConfig(max_draft=8, tree_width=3), c)
    for p in (chain, tree):
        p.alpha = [0.6] * 8
    assert chain.choose(8) == 3  # 4 tokens verified: as cheap as 1
    assert tree.choose(8) == 1  # 4 tokens verified; depth 2 would be 7


def test_alpha_is_conditional_per_depth() -> None:
    p = DraftLengthPolicy(PolicyConfig(max_draft=4, ema=0.5), costs(0.1))
    p.observe(max_depth=4, accepted=1)  # depth 1 accepted, depth 2 rejected, 3-4 unobserved
    assert p.alpha[0] > 0.5 and p.alpha[1] < 0.5 and p.alpha[2] == p.alpha[3] == 0.5


def test_batch_cost_falls_back_to_total_tokens() -> None:
    c = costs(0.1)
    assert c.verify_time(6, batch=2) == c.verify_time(6)
    c.observe_verify(6, 0.5, batch=2)
    assert c.verify_time(6, batch=2) == 0.5


def test_failed_probes_back_off_per_request_and_success_resets() -> None:
    cfg = PolicyConfig(max_draft=8, probe_every=4, probe_max_every=16, probe_length=1)
    root = DraftLengthPolicy(cfg, costs(0.3))
    root.alpha = [0.0] * 8
    child = DraftLengthPolicy(cfg, parent=root)
    gaps, since = [], 0
    for _ in range(80):
        k = child.choose(8)
        since += 1
        if k:
            gaps.append(since)
            since = 0
            child.observe(k, 0)  # every probe fails
    assert gaps[:4] == [1, 8, 16, 16]  # a request's first decision probes
    # A new request (another kind of content) is not silenced by the first one's failures: it
    # probes on its own schedule, from the shared acceptance estimates.
    other = DraftLengthPolicy(cfg, parent=root)
    assert child.probe.interval == 16 and other.probe.interval == 4
    assert [other.choose(8) for _ in range(5)] == [1, 0, 0, 0, 1]
    other.observe(1, 1)  # an accepted probe
    assert other.probe.interval == 4 and other.alpha[0] > 0.0
    assert root.alpha[0] == 0.0  # the global estimates learn from finished requests
    other.finish()
    assert root.alpha[0] > 0.0


def serve(root: DraftLengthPolicy, acceptance: float, steps: int, rng: random.Random) -> int:
    """One simulated request: each drafted depth is accepted with probability ``acceptance``
    (given the one before was); returns the steps that drafted."""
    req = DraftLengthPolicy(root.cfg, parent=root)
    drafted = 0
    for _ in range(steps):
        k = req.choose(8)
        if k:
            drafted += 1
            accepted = 0
            while accepted < k and rng.random() < acceptance:
                accepted += 1
            req.observe(k, accepted)
    req.finish()
    return drafted


def test_one_bad_request_does_not_turn_drafting_off_for_the_next() -> None:
    """Acceptance depends on the request: on one code stream a code head accepted 80-99% of
    depth-1 drafts on MBPP prompts and 0-10% on arena-hard ones. A request the head cannot
    draft for stops drafting itself; the next request, one the head suits, drafts from its
    first step (measured before this: it started with drafting off, the global estimates being
    the last request's rate, and waited for a probe)."""
    rng = random.Random(0)
    root = DraftLengthPolicy(PolicyConfig(max_draft=8, probe_every=16), costs(0.05, 0.003))
    assert serve(root, 0.8, 64, rng) >= 60
    assert serve(root, 0.0, 64, rng) <= 20  # stops drafting within the request
    assert root.best_length(8) > 0  # one request is one sample of the global estimates
    good = DraftLengthPolicy(root.cfg, parent=root)
    assert good.choose(8) > 0


def test_mixed_requests_draft_where_the_head_suits_them() -> None:
    """Alternating requests the head suits (80%) and does not (2%): the good ones draft on
    nearly every step, the bad ones stop after a few; a stream of only bad requests turns
    drafting off at the start of every request (probes only)."""
    rng = random.Random(1)
    root = DraftLengthPolicy(PolicyConfig(max_draft=8, probe_every=16), costs(0.05, 0.003))
    good, bad = [], []
    for _ in range(20):
        good.append(serve(root, 0.8, 64, rng))
        bad.append(serve(root, 0.02, 64, rng))
    assert sum(good) >= 0.9 * 20 * 64
    assert sum(bad) <= 0.3 * 20 * 64
    for _ in range(40):
        serve(root, 0.02, 64, rng)
    assert root.best_length(8) == 0
    assert serve(root, 0.02, 64, rng) <= 3  # probes only


def test_noisy_costs_never_make_more_tokens_cheaper() -> None:
    """A 2-token verify measured cheaper than a 1-token one must not make a near-useless draft
    (acceptance 5%) look worth proposing."""
    c = CostModel()
    c.observe_verify(1, 0.050)
    c.observe_verify(2, 0.045)
    c.observe_verify(3, 0.052)
    c.draft_token_s = 0.004
    assert c.verify_time(2) == 0.050 and c.verify_time(3) == 0.052
    p = DraftLengthPolicy(PolicyConfig(max_draft=4, prior_alpha=0.05), c)
    assert p.best_length(4) == 0


def test_noisy_batch_costs_never_make_more_tokens_cheaper() -> None:
    """The guard holds per batch size: 3 requests with 5 tokens measured cheaper than with 3
    must not look cheaper; another batch size's times do not leak in."""
    c = CostModel()
    c.observe_verify(1, 0.040)
    c.observe_verify(8, 0.070)
    c.observe_verify(3, 0.060, batch=3)
    c.observe_verify(5, 0.055, batch=3)
    c.observe_verify(8, 0.090, batch=4)
    assert c.verify_time(5, batch=3) == 0.060
    assert c.verify_time(9, batch=3) >= 0.060
    assert c.verify_time(8, batch=3) < 0.090


def test_one_slow_forward_does_not_stop_drafting() -> None:
    """The first forward of a new shape can take ~8x the usual time (measured: 278 ms for a
    10-token tree among 30-35 ms verifies). One such spike must not make a good head stop
    drafting; a lasting slow-down is still followed."""
    c = costs(0.02, draft_s=0.001)
    c.times.update({t: 0.030 * (1 + 0.02 * (t - 1)) for t in range(10, 26)})
    p = DraftLengthPolicy(PolicyConfig(max_draft=8, tree_width=3), c)
    p.alpha = [0.7] * 8
    k = p.choose(8)
    assert k > 0
    before = c.times[3 * k + 1]
    c.observe_verify(3 * k + 1, 8 * before)
    assert c.times[3 * k + 1] <= before * (1 + c.ema * (c.outlier - 1)) + 1e-12
    assert p.choose(8) > 0
    c.observe_draft(2, 2 * 0.05)  # a 50 ms draft depth once: also a spike
    assert c.draft_token_s <= 0.001 * (1 + c.ema * (c.outlier - 1)) + 1e-12
    assert p.choose(8) > 0
    slow = 4 * c.verify_time(9)
    for _ in range(10):  # a real 4x slow-down is followed within a few steps (as speed)
        c.observe_verify(9, slow)
    assert c.verify_time(9) > 0.9 * slow


def test_the_first_observation_is_taken_as_it_is() -> None:
    c = CostModel()
    c.observe_verify(4, 0.5)
    c.observe_draft(1, 0.2)
    assert c.times[4] == 0.5 and c.draft_token_s == 0.2


def test_a_probe_the_batch_plan_left_out_runs_at_the_next_step() -> None:
    """In a batch the plan may cap every request's draft to 0 (verification of the whole batch
    too dear): a probe that was not drafted neither counts as failed nor waits another
    interval."""
    cfg = PolicyConfig(max_draft=8, probe_every=16)
    root = DraftLengthPolicy(cfg, costs(0.3))
    root.alpha = [0.0] * 8
    req = DraftLengthPolicy(cfg, parent=root)
    assert req.choose(8) == 1  # the first decision probes
    req.capped(0)
    assert req.choose(8) == 1 and req.probe.interval == 16
    req.observe(1, 0)  # drafted this time, and rejected: a failed probe
    assert req.probe.interval == 32


def test_a_stale_calibration_spike_stops_flooring_larger_sizes() -> None:
    """A size calibration timed high and serving never verifies (a width-3 tree verifies 1, 4,
    7 ... tokens, never 2 or 3) floors larger sizes only until it has gone unmeasured for
    ``stale_after`` verifies; then the sizes serving does verify are priced as measured."""
    c = CostModel(stale_after=20)
    c.times.update({1: 0.040, 2: 0.041, 3: 0.060, 4: 0.062})  # calibration: a spike at 3
    assert c.verify_time(4) == 0.062
    for _ in range(30):
        c.observe_verify(1, 0.040)
        c.observe_verify(4, 0.041)
    assert c.verify_time(4) < 0.045  # 3's 60 ms no longer counts
    assert c.shape(3) == 0.060  # its own (stale) measurement still prices size 3
    c.observe_verify(2, 0.030)  # a fresh size below 1 token's time: still floored by it
    assert c.verify_time(2) == c.verify_time(1)
    p = DraftLengthPolicy(PolicyConfig(max_draft=4, tree_width=3, prior_alpha=0.25), c)
    c.draft_token_s = 0.003
    assert p.best_length(4) == 1  # 1.25 tokens / 44 ms beats 1 / 40 ms


def recorded_costs(speed_ema: float) -> CostModel:
    """The static arm's costs in docs/bench/shift-avx2 as its policy recorded them (ms: 45 for 1
    token, 56 for a depth-1 tree of width 3, 4 per draft depth); deeper trees' times assumed."""
    c = CostModel(speed_ema=speed_ema)
    c.times.update({1: 0.045, 4: 0.056, 7: 0.065, 10: 0.075, 13: 0.090})
    c.draft_token_s = 0.004
    return c


def test_a_stall_while_not_drafting_does_not_make_drafting_look_free() -> None:
    """A stall of the host while drafting is off (that run: one request at 6.4 tokens/s among
    ~21) slows the 1-token forwards only, since those are all the policy verifies. Learnt as the
    host's speed, it moves the sizes' ratios little, and the draft the policy picks after it
    loses at most a few percent of tokens/s at the true costs; learnt per size (speed fixed,
    the model before), it priced a 1-token forward at 156 ms next to trees at 56-65 ms, so
    drafting looked free and a head with 30% acceptance drafted trees of 7 tokens (the run:
    for 40 requests, ~15% fewer tokens/s than the same head in the other arm)."""
    true = {1: 0.045, 4: 0.056, 7: 0.065, 10: 0.075, 13: 0.090}
    alpha = [0.3, 0.27, 0.3, 0.3]
    cfg = PolicyConfig(max_draft=4, tree_width=3)

    def true_rate(k: int) -> float:
        p = DraftLengthPolicy(cfg, CostModel())
        p.alpha = list(alpha)
        return p.expected_tokens(k) / (true[3 * k + 1] + k * 0.004)

    best = max(true_rate(k) for k in range(5))
    for speed_ema, worst in ((0.5, 0.97), (0.0, None)):
        c = recorded_costs(speed_ema)
        p = DraftLengthPolicy(cfg, c)
        p.alpha = list(alpha)
        for _ in range(60):
            c.observe_verify(1, 0.156)
        chosen = []
        for _ in range(40):  # the stall is over; the policy verifies what it chooses
            k = p.best_length(4)
            chosen.append(k)
            c.observe_verify(3 * k + 1, true[3 * k + 1])
        loss = min(true_rate(k) for k in chosen) / best
        if worst is not None:
            assert loss >= worst and max(chosen) <= 1
        else:  # the model before: trees of 7 tokens, 15% below the best
            assert loss < 0.9 and min(chosen) >= 2


def test_costs_are_learnt_per_thread_count() -> None:
    """The learner moves serving between one thread (its trainer busy) and two: each count keeps
    its own speed, so a switch prices forwards at that count's level at once, and the sizes'
    ratios, shared, do not swing with the switches."""
    c = recorded_costs(0.5)
    rng = random.Random(0)
    ratios = []
    for step in range(400):
        c.condition = 1 if (step // 50) % 2 else 2
        slow = 1.6 if c.condition == 1 else 1.0
        size = 1 if step % 5 == 0 else 4
        c.observe_verify(size, slow * {1: 0.045, 4: 0.050}[size] * rng.uniform(0.95, 1.05))
        ratios.append(c.verify_time(4) / c.verify_time(1))
    assert c.speeds[1] > 1.4 * c.speeds[2]
    c.condition = 2
    assert abs(c.verify_time(1) - 0.045) < 0.005
    tail = ratios[100:]
    assert max(tail) - min(tail) < 0.1 and abs(tail[-1] - 0.050 / 0.045) < 0.05


def test_seed_weight_is_the_share_of_the_global_estimate_not_yet_measured() -> None:
    """Each finished request that drafted a depth moves the global estimate toward its own rate
    by its weight, and that depth's seed weight falls by the same factor; depths not drafted
    keep theirs; a restart (a new head) makes every estimate a seed again."""
    root = DraftLengthPolicy(PolicyConfig(max_draft=4, request_ema=0.1, request_full_trials=8))
    for trials in (8, 4):
        req = DraftLengthPolicy(root.cfg, parent=root)
        for _ in range(trials):
            req.observe(1, 0)  # depth 1 drafted and rejected: depth 2 not reached
        req.finish()
    assert root.seed_weight[0] == pytest.approx(0.9 * 0.95)
    assert root.seed_weight[1:] == [1.0, 1.0, 1.0]
    assert root.alpha[0] == pytest.approx(0.5 * 0.9 * 0.95)  # the seed's share of 0.5 is left
    (w, wm), unmeasured = root.measured()[:2]
    assert w == pytest.approx(1 - 0.9 * 0.95) and wm == pytest.approx(0.0)  # measured rate 0
    assert unmeasured == (0.0, 0.0)
    root.restart([0.3, 0.2])
    assert root.seed_weight == [1.0] * 4 and root.alpha == [0.3, 0.2, 0.2, 0.2] == root.seed


def test_depth_probes_measure_a_depth_the_estimates_never_draft_until_it_is_measured() -> None:
    """With deep_probe_every = 4, one drafting step in four drafts one depth deeper than the
    estimates pick, while the global estimate at that depth is still mostly its seed; once
    requests have measured it there (seed weight at most deep_probe_until), no more. Off by
    default."""
    def request(cfg: PolicyConfig, root: DraftLengthPolicy) -> list[int]:
        req = DraftLengthPolicy(cfg, parent=root)
        choices = []
        for _ in range(16):
            k = req.choose(8)
            choices.append(k)
            req.observe(k, k)  # every drafted depth accepted
        req.finish()
        return choices

    prior = (0.6, 0.05)  # depth 1 pays, depth 2 does not (as seeded)
    off = PolicyConfig(max_draft=4, prior_alpha=prior, ema=0.0)
    assert request(off, DraftLengthPolicy(off, costs(0.05))) == [1] * 16
    cfg = PolicyConfig(max_draft=4, prior_alpha=prior, ema=0.0, deep_probe_every=4,
                       request_ema=0.25, request_full_trials=4)
    root = DraftLengthPolicy(cfg, costs(0.05))
    first = request(cfg, root)
    assert first == [1, 1, 1, 2] * 4
    assert root.seed_weight[1] == pytest.approx(0.75)  # 4 trials at depth 2: one full request
    request(cfg, root)
    request(cfg, root)  # 0.75 ** 3 < 0.5: depth 2 is measured now
    assert root.seed_weight[1] < cfg.deep_probe_until
    assert root.alpha[1] == pytest.approx(1 - 0.95 * 0.75 ** 3)  # measured: all accepted
    k = root.best_length(8)
    assert k >= 2  # depth 2 pays now ...
    assert request(cfg, root) == [k, k, k, k + 1] * 4  # ... and the next depth is probed


def test_a_stale_size_is_priced_afresh_without_moving_the_speed() -> None:
    """A size verified again after going stale restarts its average: its first observation
    sets its shape (at the speed of now, which that observation does not move, since its old
    shape is what is in doubt), the n-th weighs 1/n until that falls to ``ema``."""
    c = CostModel(stale_after=20)
    c.times.update({1: 0.030, 4: 0.031, 7: 0.045})  # 7 priced in a slow moment
    for _ in range(15):
        c.observe_verify(1, 0.060)  # the host at half speed now, for every size
        c.observe_verify(4, 0.062)
    assert c.stale(7) and not c.stale(4) and not c.stale(1)
    speed = c.speed
    assert speed == pytest.approx(2.0, rel=0.05)
    c.observe_verify(7, 0.064)  # its true shape: 32 ms at speed 1
    assert c.speed == speed
    assert c.shape(7) == pytest.approx(0.064 / speed)  # was 45 ms: one ema step, 43.6
    for seconds in (0.072, 0.056, 0.064):  # the next ones average with it, 1/2, 1/3, 1/4
        c.observe_verify(7, seconds)
    assert c.shape(7) == pytest.approx(0.064 / speed)
    assert c.repricing[7] == 4
    for _ in range(6):
        c.observe_verify(7, 0.064)
    assert 7 not in c.repricing  # from the 10th, the usual ema


def test_a_stale_price_one_depth_deeper_is_timed_again_and_then_drafted() -> None:
    """With reprice_burst = 8, once the verify size one depth deeper than the estimates pick has
    gone ``stale_after`` verifies unmeasured, the next 8 drafting steps draft that depth; priced
    as measured, it pays and the policy keeps it. Off (0), a price taken in a slow moment keeps
    the policy one depth short for as long as it serves."""
    true = {1: 0.030, 4: 0.031, 7: 0.032, 10: 0.040, 13: 0.050}

    def serve(burst: int, steps: int = 60) -> list[int]:
        c = CostModel(stale_after=20)
        c.times.update(true)
        c.times[7] = 0.045  # depth 2 priced too dear (at 45 ms it does not pay; at 32 it does)
        c.draft_token_s = 0.001
        cfg = PolicyConfig(max_draft=4, tree_width=3, prior_alpha=(0.5, 0.4, 0.05), ema=0.0,
                           reprice_burst=burst)
        p = DraftLengthPolicy(cfg, c)
        choices = []
        for _ in range(steps):
            k = p.choose(4)
            choices.append(k)
            c.observe_verify(3 * k + 1, true[3 * k + 1])
        return choices

    assert serve(0) == [1] * 60
    choices = serve(8)
    assert choices[:21] == [1] * 21  # depth 2's calibration counts as fresh for 20 verifies
    # Then it is timed again: once is enough to price it as measured, so from there it is
    # drafted on its merit, and depth 3 (as stale: calibrated, never verified) is timed in turn,
    # 8 steps each time it has gone 20 verifies unmeasured.
    assert choices[21:] == [2] + [3] * 8 + [2] * 21 + [3] * 8 + [2]
