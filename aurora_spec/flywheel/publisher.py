"""Serving side of versioning: take a candidate, swap it in between engine steps, watch live
acceptance by version, roll back by itself when a new version does worse.

- ``offer(path)`` loads a candidate checkpoint (safetensors + manifest; a corrupt or incompatible
  one is refused with a log line and serving keeps its version), then swaps.
- ``swap`` hands ``drafter.swap_head(new)`` to ``engine.call_between_steps``: it runs on the
  engine thread between two steps, so no step ever sees a half-updated head, and the pause is
  one function call (the drafter rebuilds its draft caches lazily).
- the same between-steps action resets the engine's draft-length policy to what is known about
  the new version (the gate's per-depth offline acceptance, or the estimates it had when it was
  last live): estimates learnt on a blank day-0 head would otherwise keep drafting off (probes
  back off exponentially) long after a good version went live.
- ``observe`` (engine thread, per verify step) keeps accepted tokens per drafting step by draft
  version. After a swap u -> v, once v has ``min_steps`` drafting steps, it is compared with u's
  recent level; a drop beyond ``drop`` (relative) and ``min_gap`` (absolute) makes v a suspect.
  Those are different requests, so with a ``judge`` (the trainer, which scores both heads on the
  same fresh traffic: flywheel/judge.py) the suspect is rolled back only on its ``verdict``;
  without one, or when no verdict comes within ``verdict_steps`` more drafting steps of v, or the
  judge had too little traffic, the live drop alone rolls back to u.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from aurora_spec.drafters.eagle3_head import Eagle3Head
from aurora_spec.drafters.policy import per_depth
from aurora_spec.flywheel.checkpoints import CheckpointStore

log = logging.getLogger(__name__)


@dataclass
class VersionStats:
    steps: int = 0  # verify steps with a non-empty proposal
    accepted: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=256))

    @property
    def mean(self) -> float:
        return self.accepted / self.steps if self.steps else 0.0

    @property
    def recent_mean(self) -> float:
        return sum(self.recent) / len(self.recent) if self.recent else 0.0


@dataclass
class _Watch:
    previous: Eagle3Head
    new_version: int
    baseline: float | None  # previous version's recent accepted/step; None: too few steps
    suspect: str = ""  # why the new version looks worse, while a verdict is awaited
    deadline: int = 0  # the new version's drafting steps by which the verdict must come


def paired_seed(candidate: Sequence[float], live: Sequence[float],
                measured: Sequence[tuple[float, float]], floor: float = 0.01) -> list[float]:
    """Per depth: the candidate's rate on the gate's slice, moved by what serving measured for
    the live head beyond the live head's own rate on that slice, as far as serving's estimate
    is a measurement: c + w * (m - live), within [floor, 1 - floor]. ``measured``: per depth
    (w, w * m), DraftLengthPolicy.measured(): w the weight serving's estimate gives its
    measurements, m their mean; w = 0 gives the candidate's rate as it is, w = 1 serving's
    measurement plus the candidate's gain on the slice. (The gate's lists extend by their last
    value, as PolicyConfig.prior_alpha does.) Why not serving's estimate as it is: for a head
    that barely drafted, or at a depth it never drafts, it is its seed, and pairing a seed with
    a small slice's gain moved it to where drafting never went to correct it ([4x]: a depth-1
    seed of 0.044 where the gate said 0.185; depths 2-3 held at 0.01-0.16 for a whole run)."""
    n = len(measured)
    return [min(1 - floor, max(floor, c + wm - w * lv))
            for c, lv, (w, wm) in zip(per_depth(candidate, n), per_depth(live, n), measured,
                                      strict=True)]


class Publisher:
    def __init__(self, drafter: Any, engine: Any = None, model: Any = None,
                 store: CheckpointStore | None = None, min_steps: int = 48, drop: float = 0.25,
                 min_gap: float = 0.1, on_change: Callable[[str, Eagle3Head], None] | None = None,
                 judge: Callable[[int, int], bool] | None = None, verdict_steps: int = 256,
                 ) -> None:
        self.drafter, self.engine, self.model, self.store = drafter, engine, model, store
        self.min_steps, self.drop, self.min_gap = min_steps, drop, min_gap
        self.on_change = on_change
        # judge(new_version, previous_version): ask for a paired verdict; False: cannot be asked
        self.judge, self.verdict_steps = judge, verdict_steps
        self.kept = 0  # suspects a paired verdict kept live
        self.live: Eagle3Head = drafter.head
        self.previous: Eagle3Head | None = None
        self.by_version: dict[int, VersionStats] = {}
        self.swaps = self.rollbacks = self.refused = 0
        self.bad_versions: set[int] = set()
        self._watch: _Watch | None = None
        self._alpha: dict[int, Sequence[float] | None] = {}  # policy estimates of past versions
        self._lock = threading.RLock()

    @property
    def live_version(self) -> int:
        return int(self.live.version)

    @property
    def head_width(self) -> int:
        """The branches the serving drafter's head drafts at depth 1 (what its rates are for)."""
        return int(getattr(self.drafter, "head_width", 1))

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        w = self.drafter.head.fc.weight
        return w.device, w.dtype

    def offer(self, path: str, alpha: Sequence[float] | None = None,
              live_alpha: Sequence[float] | None = None) -> Eagle3Head | None:
        """Load a candidate checkpoint and make it live; None when refused. ``alpha``: its
        per-depth acceptance estimated offline (seeds the draft-length policy); with
        ``live_alpha``, the live head's on the same slice, the seed is paired instead
        (``paired_seed``; TrainerConfig.paired_policy_seed)."""
        device, dtype = self._device_dtype()
        try:
            head = CheckpointStore.load(path, self.model, device, dtype)
        except ValueError as e:
            self.refused += 1
            log.warning("refusing candidate checkpoint %s: %s; serving stays on version %d",
                        path, e, self.live_version)
            return None
        if head.version in self.bad_versions:
            self.refused += 1
            log.warning("refusing candidate %s: version %d was rolled back", path, head.version)
            return None
        head.eval()
        for p in head.parameters():
            p.requires_grad_(False)
        self.drafter.pack(head)  # here, not in the between-steps swap: a short pause
        self.swap(head, watch=True, alpha=alpha, live_alpha=live_alpha)
        return head

    def swap(self, head: Eagle3Head, watch: bool = True, reason: str = "candidate",
             alpha: Sequence[float] | None = None,
             live_alpha: Sequence[float] | None = None) -> None:
        with self._lock:
            old = self.live
            baseline = None
            stats = self.by_version.get(old.version)
            if stats is not None and len(stats.recent) >= self.min_steps // 2:
                baseline = stats.recent_mean
            self.previous, self.live = old, head
            self._watch = _Watch(old, head.version, baseline) if watch else None
            self.swaps += 1
        if alpha is None:  # what the policy measured while it was live, else its held-out
            alpha = self._alpha.get(head.version) or head.rates_at(self.head_width)

        def action() -> None:
            self._alpha[old.version] = self._reset_policy(alpha, live_alpha)
            self.drafter.swap_head(head)

        self._run_between_steps(action)
        log.info("draft version %d -> %d (%s)", old.version, head.version, reason)
        if self.store is not None:
            try:
                self.store.mark_live(head.version)
            except OSError as e:
                log.warning("cannot record the live version in %s: %s", self.store.root, e)
        if self.on_change is not None:
            self.on_change(reason, head)

    def _reset_policy(self, alpha: Sequence[float] | None,
                      live_alpha: Sequence[float] | None = None) -> list[float] | None:
        """Engine thread: set the draft-length policies' acceptance estimates (global and per
        running request) to ``alpha`` (None: the prior; with ``live_alpha``: ``alpha`` moved by
        what serving measured for the live head beyond ``live_alpha``, ``paired_seed``) and
        restart probing; returns the old global estimates."""
        policy = getattr(self.engine, "policy", None)
        if policy is None:
            return None
        old = list(policy.alpha)
        new = (paired_seed(alpha, live_alpha, policy.measured()) if alpha and live_alpha
               else alpha or policy.cfg.prior_alpha)
        running = [getattr(s, "policy", None) for s in getattr(self.engine, "running", [])]
        for p in [policy, *running]:
            if p is not None:  # the new head's estimates, its own counts; probe at once
                p.restart(new)
        return old

    def _run_between_steps(self, fn: Callable[[], None]) -> None:
        if self.engine is not None:
            self.engine.call_between_steps(fn)
        else:
            fn()

    def rollback(self, reason: str = "manual") -> bool:
        with self._lock:
            prev = self.previous
            if prev is None:
                return False
            bad = self.live.version
            self.bad_versions.add(bad)
            self.rollbacks += 1
            self.previous = None
        log.warning("rolling back draft version %d -> %d (%s)", bad, prev.version, reason)
        if self.store is not None:
            try:
                self.store.mark_bad(bad)
            except OSError as e:
                log.warning("cannot mark version %d bad: %s", bad, e)
        self.swap(prev, watch=False, reason=f"rollback: {reason}")
        return True

    def observe(self, version: int, drafted: int, accepted: int) -> None:
        """One verify step's outcome (engine thread): ``drafted`` > 0 when the head drafted (steps
        without a head draft say nothing about a version). Cheap: a few integer updates."""
        if drafted <= 0:
            return
        stats = self.by_version.get(version)
        if stats is None:
            stats = self.by_version[version] = VersionStats()
        stats.steps += 1
        stats.accepted += accepted
        stats.recent.append(accepted)
        w = self._watch
        if w is None or version != w.new_version or stats.steps < self.min_steps:
            return
        if w.suspect:
            if stats.steps >= w.deadline and self._end_watch(version):
                self.rollback(f"{w.suspect}; no paired verdict came")
            return
        now = stats.recent_mean
        if w.baseline is None or not (now < w.baseline * (1 - self.drop)
                                      and w.baseline - now >= self.min_gap):
            self._end_watch(version)  # it holds up
            return
        reason = f"live acceptance fell from {w.baseline:.2f} to {now:.2f} tokens per drafting step"
        # A suspect before asking: the verdict may come back before the judge call returns.
        w.suspect, w.deadline = reason, stats.steps + self.verdict_steps
        if self.judge is not None and self.judge(version, int(w.previous.version)):
            log.info("draft version %d: %s; asking for a paired verdict", version, reason)
        elif self._end_watch(version):
            self.rollback(reason)

    def _end_watch(self, version: int) -> bool:
        """Stop watching ``version``; False when it is no longer the one watched."""
        with self._lock:
            w = self._watch
            if w is None or w.new_version != version:
                return False
            self._watch = None
            return True

    def verdict(self, version: int, keep: bool | None, detail: str = "") -> None:
        """The judge's paired verdict on suspect ``version`` (any thread): False rolls it back,
        None (too little traffic to compare) falls back on the live drop, True keeps it."""
        w = self._watch
        if w is None or not w.suspect or not self._end_watch(version):
            return  # not (or no longer) a suspect: another swap came first
        if keep:
            self.kept += 1
            log.info("keeping draft version %d: %s (%s)", version, detail, w.suspect)
        else:
            self.rollback(f"{w.suspect}; {detail}" if detail else w.suspect)

    def status(self) -> dict:
        return {"live_version": self.live_version, "swaps": self.swaps,
                "rollbacks": self.rollbacks, "kept_after_verdict": self.kept,
                "candidates_refused": self.refused,
                "serving_version": int(getattr(self.drafter.head, "version", -1)),
                "live_acceptance": {str(v): {"steps": s.steps, "accepted_per_step":
                                             round(s.mean, 3)}
                                    for v, s in sorted(self.by_version.items())[-8:]}}
