"""Adaptive draft length: draft as many tokens as pay for themselves, down to zero.

The policy keeps running estimates of
- alpha_i, the probability that the draft token at depth i is accepted given depth i-1 was,
- t(T), the wall time of a target forward over T tokens (T = k + 1 for a chain of k, w*k + 1 for
  a tree of w branches),
- c, the wall time of drafting one depth (one token of a chain, w sibling tokens of a tree),
and picks k maximising expected tokens per second, E_k / (t(k+1) + k c), with
E_k = 1 + sum_{i<=k} prod_{j<=i} alpha_j (Leviathan et al. 2023, with measured costs). When k = 0
wins, the policy still probes with a short draft every ``probe_every`` steps so that a drafter that
improves (the online learner) is noticed; the probe costs a few percent at most. With
``deep_probe_every`` set it also drafts one depth deeper now and then, while that depth's
estimate is still the seed a swap gave it (off by default: measured a tie, HISTORY.md session 63),
and with ``reprice_burst`` set it drafts one depth deeper for a few steps when that depth's price
has gone stale (off by default: prices as measured, tokens/s a tie, HISTORY.md session 64).

Acceptance estimates are per request, and global: every request starts from the global ones,
which learn from each finished request as one sample (its own acceptance rate per depth), not
from every step. Probing is per request, and a request's first drafting decision is a probe when
drafting is off. Why: acceptance depends on the request (a code head accepted 80-99% of
depth-1 drafts on MBPP prompts and 0-10% on the arena-hard prompts of the same code stream);
a global estimate moved at every step was the last request's rate, so each MBPP prompt after an
arena-hard one started with drafting off and waited 16 steps for a probe (measured: the same
head at 1.15x target-only instead of 1.41x on 30 code requests at half load).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


def per_depth(alpha: float | Sequence[float], n: int) -> list[float]:
    """``n`` per-depth acceptance estimates from one value or a list (its last value repeated
    past its end)."""
    if isinstance(alpha, (int, float)):
        return [float(alpha)] * n
    if not alpha:
        raise ValueError("an empty per-depth acceptance list")
    return [float(alpha[min(i, len(alpha) - 1)]) for i in range(n)]


@dataclass(frozen=True)
class PolicyConfig:
    max_draft: int = 8
    fixed_draft: int | None = None  # set to disable adaptation (benchmarks, tests)
    # Acceptance assumed before any is measured: one value for every depth, or one per depth
    # (a trained head's held-out estimates; the last value extends to deeper depths).
    prior_alpha: float | tuple[float, ...] = 0.5
    ema: float = 0.1  # weight of a new observation (within a request)
    # Weight of one finished request in the global estimates (the start of every request);
    # a request that drafted a depth fewer than ``request_full_trials`` times weighs less.
    request_ema: float = 0.1
    request_full_trials: int = 8
    probe_every: int = 16  # first probe interval (steps) once drafting stopped paying
    probe_max_every: int = 256  # failed probes double the interval up to this
    probe_length: int = 1
    # Nodes the drafter proposes per depth (top-w trees): a depth-k draft is verified as w*k + 1
    # tokens, while drafting it costs k head steps (the w branches of a depth share one step).
    tree_width: int = 1
    # Depth probes: every this many drafting steps of a request, draft one depth deeper than
    # the estimates pick, while the global estimate at that depth is still mostly the seed it
    # got at the last swap (DraftLengthPolicy.seed_weight above ``deep_probe_until``); 0: off.
    # Why: a depth the policy does not draft is never measured, so a seed too low for it stays
    # for as long as the head is live (an online head on SQL drafted one depth of its tree,
    # its depth-2 seeds 0.24-0.41, where the SQL head drafted three at 0.57-0.62:
    # docs/results/gate.md, "Two identical online arms"). The price while it probes: one head step
    # and one depth of verified nodes every ``deep_probe_every`` steps. Measured with 8 (docs/bench/
    # shift-measured/): the head drafted two deep on SQL, its depth-2 rate as the gate had
    # seeded it (the seeds were not too low), tau +0.14 and tokens/s a tie; on day 0 tau
    # 2.30 against 2.27 at 1.40x against 1.41x (docs/bench/day0-measured/); not adopted.
    deep_probe_every: int = 0
    deep_probe_until: float = 0.5
    # When the verify size of one depth deeper than the estimates pick has gone unmeasured for
    # the cost model's ``stale_after`` verifies, the next ``reprice_burst`` drafting steps draft
    # that depth, and the cost model averages their times afresh (CostModel.observe_verify);
    # 0: off. Why: the cost model re-measures only the sizes the policy chooses, so a price
    # taken in a slow moment (or a slow calibration) keeps the policy from choosing that size
    # for as long as serving runs. In a shift run the online head held the same SQL estimates in
    # two arms and only the one that drafted depth 2 now and then drafted it for good: at those
    # rates depth 2 pays if its verify costs at most ~1.10x depth 1's, and this host measures
    # ~1.0x (docs/results/gate.md, "Pairing only what serving measured"). The price:
    # ``reprice_burst`` steps one depth deeper every ``stale_after`` verifies at most (8 in 512:
    # ~1.5% of steps). Measured with 8 (docs/bench/shift-reprice/, day0-reprice/): without it the
    # arms priced a depth-2 forward at 1.39x (online) and 1.78x (static) a depth-1 one, with it at
    # 1.00x as calibration measures; the online head then drafted two deep on SQL and code, tau
    # +0.10 to +0.17, tokens/s a tie (1.15x against 1.16x the static head, 1.15x against 1.13x in a
    # repeat); not adopted.
    reprice_burst: int = 0


@dataclass
class CostModel:
    """Measured forward times per number of tokens T, shared by all requests, as speed x shape.

    ``times`` is the shape: seconds per size at speed 1 (the speed of the calibration, or of the
    first observation). ``speeds`` holds one speed per serving condition (``condition``: the
    engine's thread count, set before each step), learnt fast from every verify, whatever its
    size; a size's shape learns slowly, from what its times say beyond the speed. Why: the policy
    verifies one or two sizes for long stretches, so a size it stopped choosing kept whatever its
    last time was. The host's speed moves every size at once (a neighbour's burst, the trainer
    taking a core, an hour of slow memory) and the policy needs the sizes' ratios, so a stale size
    priced the wrong draft: in a shift run a stall of the host during a request that did not draft
    (9.8 s for 63 tokens, ~3 s as usual) put a 1-token forward at 165 ms (normal 45), drafting
    looked free next to it, and the static head drafted trees of 7 tokens at ~15% fewer tokens/s
    than the same head in the other arm for 40 requests (docs/bench/shift-avx2, requests 14-52);
    in a day-0 run the estimated ratio of a depth-1 tree's forward to a 1-token one drifted
    between 1.0 and 1.8 as the trainer took and gave back a core (measured at a fixed thread
    count: 1.14-1.17 on two, 1.18-1.33 on one; scripts/verify_shapes.py). Speed cancels out of
    every choice the policy makes; it only keeps a slow-down from being learnt as a change of
    shape.

    One observation moves an estimate toward at most ``outlier`` times its current value. Why:
    the first forward of a new shape (oneDNN builds its kernels), a GC pause or a burst of another
    process can take 5-10x the usual time, and one such spike taken at face value stopped a
    trained head from drafting for a whole benchmark (a 278 ms verify of a 10-token tree among
    30-35 ms ones). A real, lasting slow-down is followed within a few verifies, as speed.

    More tokens never cost less: a size's shape is at least that of every smaller size measured
    within the last ``stale_after`` single-request verifies (and of 1 token). Why not every
    smaller size: a drafter verifies few of the sizes calibration times (a width-3 tree without
    the lookup chain: 1, 4, 7 ... tokens), and one calibration spike at an unused size then
    floored every larger one for good (a bench's static arm kept a 4-token verify at 45.6 ms
    where it measured ~40, so it priced its drafts 14% too dear and stopped drafting).

    A size verified again after going stale restarts its average (``_shape_ema``), and
    ``PolicyConfig.reprice_burst`` has the policy verify the size one depth deeper when it is
    stale. Why: the sizes the policy does not choose keep whatever price they last had, and
    that price drifts from the sizes it does choose (in a shift run a depth-2 forward stayed
    priced at 1.4-2.3x a depth-1 one, where it costs ~1.0x)."""

    ema: float = 0.1  # weight of a new observation in a shape (and in drafting's time)
    # The speed's, higher: it absorbs a slow-down within a few forwards, so the shapes see times
    # divided by the speed of now. The price: a size calibrated wrong and verified most of the
    # time passes part of its error to the others for a while (scripts/cost_model_sim.py: a
    # wandering host moves the ratio of two sizes by +-3% with it, -13%/+18% without; a 1.5x
    # calibration error ends 1.10x off after 60 verifies with it, 1.01x without).
    speed_ema: float = 0.5
    outlier: float = 2.0
    stale_after: int = 512
    times: dict[int, float] = field(default_factory=dict)  # shape: batch of 1, by tokens
    # Sizes being priced afresh after going stale -> their observations since (_shape_ema).
    repricing: dict[int, int] = field(default_factory=dict)
    observed: int = 0  # single-request verifies observed
    last_seen: dict[int, int] = field(default_factory=dict)  # tokens -> ``observed`` then
    batch_times: dict[tuple[int, int], float] = field(default_factory=dict)  # (batch, tokens)
    draft_token_s: float = 0.0  # drafting one depth, at speed 1
    condition: int = 0  # what serving runs on now (the engine's thread count)
    speeds: dict[int, float] = field(default_factory=dict)  # condition -> speed

    def _update(self, old: float | None, seconds: float, ema: float) -> float:
        if not old:  # nothing measured yet: the first observation is all there is
            return seconds
        return old + ema * (min(seconds, self.outlier * old) - old)

    @property
    def speed(self) -> float:
        return self.speeds.get(self.condition, 1.0)

    def observe_verify(self, tokens: int, seconds: float, batch: int = 1) -> None:
        if batch == 1:
            ema = self._shape_ema(tokens)
            self.observed += 1
            self.last_seen[tokens] = self.observed
            self.times[tokens] = self._learn(self.times.get(tokens), seconds, ema,
                                             move_speed=tokens not in self.repricing)
        else:
            key = (batch, tokens)
            self.batch_times[key] = self._learn(self.batch_times.get(key), seconds)

    def stale(self, tokens: int) -> bool:
        """Not verified (nor calibrated) within the last ``stale_after`` single-request verifies
        (never 1 token: every size is floored by it). A stale size no longer floors larger ones
        (``shape``) and is priced afresh when verified again (``_shape_ema``)."""
        return tokens != 1 and self.observed - self.last_seen.get(tokens, 0) > self.stale_after

    def due_for_pricing(self, tokens: int, observations: int) -> bool:
        """Whether a forward of ``tokens`` tokens should be timed now: it was priced once and is
        stale, or is being priced afresh with fewer than ``observations`` timings so far."""
        if tokens not in self.times:
            return False  # never priced: the curve between measured sizes stands in for it
        return self.stale(tokens) or self.repricing.get(tokens, observations) < observations

    def _shape_ema(self, tokens: int) -> float:
        """The weight of this observation in the size's shape: the usual ``ema``, except that a
        size verified after going stale restarts its average (the n-th observation since weighs
        1/n, until that falls to ``ema``). Why: one observation moves a shape by a tenth of the
        gap, so a price that went wrong while unmeasured took ~20 verifies of that size to
        mend, and the policy does not choose a size it prices too dear."""
        if tokens in self.times and self.stale(tokens):
            self.repricing[tokens] = 0
        if tokens not in self.repricing:
            return self.ema
        n = self.repricing[tokens] = self.repricing[tokens] + 1
        if 1 / n <= self.ema:
            del self.repricing[tokens]
        return max(self.ema, 1 / n)

    def _learn(self, shape: float | None, seconds: float, ema: float | None = None,
               move_speed: bool = True) -> float:
        """Move the speed (unless this size's shape is being priced afresh: a wrong shape would
        move it the wrong way), then this size's shape by ``ema`` (default the usual); returns
        the shape."""
        if not shape:  # a size not seen before: its shape at the speed of now
            return seconds / self.speed
        speed = self.speed
        if move_speed:  # a condition not seen before starts at speed 1 (a spike, maybe)
            speed = self.speeds[self.condition] = self._update(speed, seconds / shape,
                                                               self.speed_ema)
        return self._update(shape, seconds / speed, self.ema if ema is None else ema)

    def observe_draft(self, tokens: int, seconds: float) -> None:
        if tokens > 0:
            self.draft_token_s = self._update(self.draft_token_s, seconds / tokens / self.speed,
                                              self.ema)

    def draft_time(self) -> float:
        """Seconds of drafting one depth now."""
        return self.speed * self.draft_token_s

    def verify_time(self, tokens: int, batch: int = 1) -> float:
        """t(T) now for a forward over ``tokens`` tokens in total, from ``batch`` requests (a
        batch forwards only its real tokens)."""
        return self.speed * self.shape(tokens, batch)

    def shape(self, tokens: int, batch: int = 1) -> float:
        """t(T) at speed 1: measured when seen, else the single-request curve at the same number
        of tokens (forwards are matmul-bound)."""
        if batch > 1:
            seen = self.batch_times.get((batch, tokens))
            base = seen if seen is not None else self.shape(tokens)
            # The same guard per batch size: a larger measured total never looks cheaper.
            below = [t for (b, s), t in self.batch_times.items() if b == batch and s <= tokens]
            return max(base, max(below, default=0.0))
        # More tokens never cost less. Measured times are noisy and the CPU kernels make 1-4
        # tokens cost the same, so without this running max a 2-token verify measured 10%
        # cheaper than a 1-token one would make a useless day-0 head draft on every step.
        below = [t for s, t in self.times.items() if s <= tokens and not self.stale(s)]
        return max(self._curve(tokens), max(below, default=0.0))

    def _curve(self, tokens: int) -> float:
        if tokens in self.times:
            return self.times[tokens]
        if not self.times:
            return 1.0 + 0.05 * (tokens - 1)  # unmeasured: assume verification is nearly free
        sizes = sorted(self.times)
        lo = max((s for s in sizes if s < tokens), default=None)
        hi = min((s for s in sizes if s > tokens), default=None)
        if lo is None:
            return self.times[hi]  # type: ignore[index]
        if hi is None:
            # Beyond the largest measured size, grow at the last measured slope (>= 0).
            prev = max((s for s in sizes if s < lo), default=None)
            slope = 0.0 if prev is None else max(0.0, (self.times[lo] - self.times[prev]) / (lo - prev))
            return self.times[lo] + slope * (tokens - lo)
        w = (tokens - lo) / (hi - lo)
        return self.times[lo] * (1 - w) + self.times[hi] * w


@dataclass
class ProbeState:
    """One request's probing schedule: the first decision with drafting off probes (a request
    may suit the head where the ones before did not), a failed probe makes the next one wait
    twice as long (a useless drafter then costs two or three one-token probes per request), an
    accepted probe brings the interval back to its start."""

    interval: int
    steps_since: int = 0

    @classmethod
    def starting(cls, interval: int) -> ProbeState:
        return cls(interval, steps_since=interval - 1)


@dataclass(frozen=True)
class PolicySnapshot:
    """What the policy believed at one moment (recorded per request at its start and end, so a
    benchmark shows why a request drafted what it drafted)."""

    alpha: tuple[float, ...]  # this policy's per-depth acceptance estimates (first 3 depths)
    draft_ms: float  # drafting one depth
    # Forwards of 1 token, of a depth-1 draft and of a depth-2 one, as priced. Why the third: a
    # size the policy stopped choosing keeps the price it last measured (its calibration if it
    # was never chosen), and whether depth 2 pays turns on it (HISTORY.md, session 63).
    verify_ms: tuple[float, float, float]
    best_length: int  # the k the estimates pick (0: drafting off, probes only)
    probe_interval: int

    def as_dict(self) -> dict[str, object]:
        return {"alpha": list(self.alpha), "draft_ms": self.draft_ms,
                "verify_ms": list(self.verify_ms), "best_length": self.best_length,
                "probe_interval": self.probe_interval}


class DraftLengthPolicy:
    """Acceptance statistics + a shared cost model -> draft length for the next step.

    The engine keeps one global policy and gives each request a child (``parent=``): the child
    starts from the global acceptance estimates, and its observations update both."""

    def __init__(self, cfg: PolicyConfig, costs: CostModel | None = None,
                 parent: DraftLengthPolicy | None = None) -> None:
        self.cfg = cfg
        self.parent = parent
        self.costs: CostModel = costs or (parent.costs if parent else CostModel())
        self.alpha: list[float] = (list(parent.alpha) if parent
                                   else per_depth(cfg.prior_alpha, cfg.max_draft))
        self.probe = ProbeState.starting(cfg.probe_every)
        self._probing = False  # the last choice was a probe (per request: batches interleave)
        self._deep_since = 0  # drafting steps since the last depth probe
        # Per depth, the weight ``alpha`` still gives the seed it got at the last restart (1:
        # nothing measured since; each folded request multiplies it by one minus its weight).
        # Why: a swap that pairs the gate's figures with serving's own (publisher.paired_seed)
        # must know whether serving's figure is a measurement or still a seed.
        self.seed_weight = [1.0] * cfg.max_draft
        self.seed = list(self.alpha)  # ... and that seed
        self._forget_counts()

    def _forget_counts(self) -> None:
        # This request's own counts per depth, folded into the parent's estimates by finish().
        self.hits = [0] * self.cfg.max_draft
        self.trials = [0] * self.cfg.max_draft

    def restart(self, alpha: float | Sequence[float]) -> None:
        """A new head went live: take its acceptance estimates (one value, or one per depth),
        forget the counts measured on the old one, and probe at the next decision."""
        self.alpha[:] = per_depth(alpha, len(self.alpha))
        self.seed_weight[:] = [1.0] * len(self.alpha)
        self.seed[:] = self.alpha
        self._forget_counts()
        self.probe = ProbeState.starting(self.cfg.probe_every)

    def measured(self) -> list[tuple[float, float]]:
        """Per depth, what the estimate holds beyond its seed: (w, w * m), where w is the
        weight it gives measurements (1 - seed_weight) and m their weighted mean (the estimate
        is (1 - w) * seed + w * m)."""
        return [(1 - sw, a - sw * s)
                for a, sw, s in zip(self.alpha, self.seed_weight, self.seed, strict=True)]

    def expected_tokens(self, k: int) -> float:
        total, run = 1.0, 1.0
        for i in range(k):
            run *= self.alpha[i]
            total += run
        return total

    def best_length(self, limit: int) -> int:
        """The k in [0, limit] with the highest expected tokens per second."""
        c = self.costs.draft_time()
        best_k, best_rate = 0, 1.0 / self.costs.verify_time(1)
        w = self.cfg.tree_width
        for k in range(1, min(limit, self.cfg.max_draft) + 1):
            rate = self.expected_tokens(k) / (self.costs.verify_time(w * k + 1) + k * c)
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k

    def snapshot(self) -> PolicySnapshot:
        c, w = self.costs, self.cfg.tree_width

        def ms(tokens: int) -> float:
            return round(c.verify_time(tokens) * 1e3, 2)

        return PolicySnapshot(tuple(round(a, 3) for a in self.alpha[:3]),
                              round(c.draft_time() * 1e3, 2), (ms(1), ms(w + 1), ms(2 * w + 1)),
                              self.best_length(self.cfg.max_draft), self.probe.interval)

    def choose(self, limit: int) -> int:
        """Draft length for the next step, at most ``limit`` (remaining budget / context)."""
        if limit <= 0:
            return 0
        if self.cfg.fixed_draft is not None:
            return min(self.cfg.fixed_draft, limit)
        k = self.best_length(limit)
        probe = self.probe
        self._probing = False
        if k > 0:
            probe.steps_since = 0
            return self._deeper(k, limit)
        probe.steps_since += 1
        if probe.steps_since >= probe.interval:
            probe.steps_since = 0
            self._probing = True
            return min(self.cfg.probe_length, limit)
        return 0

    def _deeper(self, k: int, limit: int) -> int:
        """``k``, or ``k + 1`` when that depth's price is stale (PolicyConfig.reprice_burst) or
        a depth probe is due (PolicyConfig.deep_probe_every)."""
        if k >= min(limit, self.cfg.max_draft):
            return k
        burst, deeper = self.cfg.reprice_burst, self.cfg.tree_width * (k + 1) + 1
        if burst and self.costs.due_for_pricing(deeper, burst):
            return k + 1
        every = self.cfg.deep_probe_every
        if not every:
            return k
        self._deep_since += 1
        seeded = (self.parent or self).seed_weight[k] > self.cfg.deep_probe_until
        if self._deep_since < every or not seeded:
            return k
        self._deep_since = 0
        return k + 1

    def capped(self, drafted: int) -> None:
        """The batch plan drafted ``drafted`` tokens where choose() asked for more: a probe
        that was not drafted is not a failed probe; it runs at the next decision instead."""
        if self._probing and not drafted:
            self._probing = False
            self.probe.steps_since = self.probe.interval - 1

    def observe(self, max_depth: int, accepted: int) -> None:
        """Update alpha_i for the depths that were drafted: depth i (1-based) was accepted iff
        i <= accepted; depths below a rejection carry no information about alpha_i."""
        if self._probing and max_depth:
            self._probing = False
            grown = min(2 * self.probe.interval, self.cfg.probe_max_every)
            self.probe.interval = self.cfg.probe_every if accepted else grown
        e = self.cfg.ema
        for depth in range(1, min(max_depth, self.cfg.max_draft) + 1):
            if depth > accepted + 1:
                break
            hit = depth <= accepted
            self.alpha[depth - 1] += e * (float(hit) - self.alpha[depth - 1])
            self.hits[depth - 1] += hit
            self.trials[depth - 1] += 1

    def finish(self) -> None:
        """The request ended: move the parent's (global) estimates toward this request's own
        acceptance rate per depth, by one request's weight at most."""
        if self.parent is None:
            return
        full, target = self.cfg.request_full_trials, self.parent.alpha
        for i, (hits, trials) in enumerate(zip(self.hits, self.trials, strict=True)):
            if trials:
                weight = self.cfg.request_ema * min(1.0, trials / full)
                target[i] += weight * (hits / trials - target[i])
                self.parent.seed_weight[i] *= 1 - weight
        self._forget_counts()  # finishing twice counts once
