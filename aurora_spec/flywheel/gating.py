"""The trainer's gate: a candidate head goes live only if its offline acceptance on held-out
recent traffic beats the live head's (that measure: flywheel/scoring.py); after a traffic shift
the slice is only traffic since the shift (TrainerConfig.gate_shift_positions); with the
prequential gate a frozen candidate is judged on the traffic that arrives after it.

A mixin of ``Trainer`` (flywheel/trainer.py), as flywheel/rest.py is: it reads the trainer's
store, heads, config and stats, and keeps its own state (``_init_gate``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from aurora_spec.flywheel.replay import FreshSlice
from aurora_spec.flywheel.scoring import Scores, score_windows
from aurora_spec.flywheel.shift import ShiftWatch

if TYPE_CHECKING:
    from aurora_spec.drafters.eagle3_head import Eagle3Head
    from aurora_spec.flywheel.average import WeightAverage
    from aurora_spec.flywheel.batch import Window
    from aurora_spec.flywheel.config import TrainerConfig
    from aurora_spec.flywheel.losses import Embedder
    from aurora_spec.flywheel.replay import WindowStore
    from aurora_spec.flywheel.trainer import TrainerStats

log = logging.getLogger(__name__)


@dataclass
class GateResult:
    passed: bool
    candidate: float  # mean accepted draft tokens per draft point (greedy chain of gate_depth)
    live: float
    positions: int
    reason: str = ""
    alpha: list[float] = field(default_factory=list)  # candidate's per-depth acceptance
    live_alpha: list[float] = field(default_factory=list)  # the live head's, same slice


class Gating:
    if TYPE_CHECKING:  # what the mixin reads from the Trainer
        cfg: TrainerConfig
        device: torch.device
        embed: Embedder
        store: WindowStore
        head: Eagle3Head
        live: Eagle3Head
        average: WeightAverage | None
        next_version: int
        stats: TrainerStats
        _autocast: Callable[[], contextlib.AbstractContextManager]

        def on_progress(self) -> None: ...

    def _init_gate(self, cfg: TrainerConfig) -> None:
        self.fresh = FreshSlice(cfg.gate_positions)  # the prequential gate's candidate and slice
        self.last_alpha: list[float] = []  # per-depth rates of the head scored last
        self._live_score: tuple[tuple, float, int, list[float]] | None = None
        self.shift = ShiftWatch(cfg.rest_wake_steps, cfg.rest_wake_drop)
        self._shift_mark: int | None = None  # store.holdout_added at the last shift, until judged

    def score(self, head: Eagle3Head, windows: list[Window] | None = None,
              depth: int | None = None) -> Scores:
        """``head``'s offline acceptance on ``windows`` (default: held-out slice); its per-depth
        rates also go to ``last_alpha``."""
        windows = self.store.holdout_slice() if windows is None else windows
        scores = score_windows(head, windows, self.embed, depth or self.cfg.gate_depth,
                               max(self.cfg.batch_tokens, 1), self.device, self._autocast,
                               self.score_width)
        self.last_alpha = list(scores.alpha)
        return scores

    @property
    def score_width(self) -> int:
        """Siblings at depth 1 of the drafts scored: ``cfg.score_width``, chains when unset
        (0 is filled in with the serving drafter's width where there is one: OnlineLearner)."""
        return self.cfg.score_width or 1

    def offline_acceptance(self, head: Eagle3Head, windows: list[Window] | None = None,
                           depth: int | None = None) -> tuple[float, int]:
        """Mean accepted draft tokens per draft point on ``windows`` (default: held-out slice),
        and the points scored."""
        scores = self.score(head, windows, depth)
        return scores.mean, scores.points

    def _on_shift(self) -> None:
        if not self.cfg.gate_shift_positions:
            return
        self._shift_mark = self.store.holdout_added
        self.store.holdout_every = self.cfg.holdout_every_shift or self.cfg.holdout_every
        log.info("traffic shift: served acceptance fell to %.3f per step; the gate judges on "
                 "traffic held out from now on (at least %d positions)", self.shift.level or 0.0,
                 self.cfg.gate_shift_positions)

    def _positions_since_shift(self) -> int | None:
        """Scored held-out positions that arrived since the shift being followed (None: none)."""
        if self._shift_mark is None:
            return None
        holdout = self.store.holdout_slice()
        new = min(self.store.holdout_added - self._shift_mark, len(holdout))
        return sum(w.scored_pairs for w in holdout[len(holdout) - new:])

    def _end_shift_when_judged(self) -> None:
        """Once gate_positions arrived since the shift, the usual slice is all new traffic."""
        since = self._positions_since_shift()
        if since is not None and since >= self.cfg.gate_positions:
            self._shift_mark = None
            self.store.holdout_every = self.cfg.holdout_every

    def gate_size(self) -> int:
        """Held-out positions the gate judges on: ``gate_positions``, or after a shift only as
        many as arrived since (at least ``gate_shift_positions``) until that many did."""
        c = self.cfg
        since = self._positions_since_shift()
        if since is None:
            return c.gate_positions
        return min(max(since, c.gate_shift_positions), c.gate_positions)

    def gate_windows(self) -> list[Window]:
        """The newest held-out windows, about ``gate_size()`` pairs in all."""
        return newest_windows(self.store.holdout_slice(), self.gate_size())

    def live_acceptance(self, windows: list[Window], source: tuple) -> tuple[float, int]:
        """The live head's offline acceptance on ``windows`` (the gate's slice, named by
        ``source``), cached until the live head or the slice changes: gates in a row with
        neither changed score the live head once. Its per-depth rates: ``live_alpha``."""
        key = (self.live.version, id(self.live), source, len(windows))
        if self._live_score is None or self._live_score[0] != key:
            mean, n = self.gate_acceptance(self.live, windows)
            self._live_score = (key, mean, n, list(self.last_alpha))
        return self._live_score[1], self._live_score[2]

    @property
    def live_alpha(self) -> list[float]:
        """The live head's per-depth rates on the slice it was scored on last."""
        return [] if self._live_score is None else list(self._live_score[3])

    def gate_acceptance(self, head: Eagle3Head, windows: list[Window]) -> tuple[float, int]:
        """``offline_acceptance`` on the gate's slice (newest window first), each window weighted
        by its recency when ``gate_half_life`` is set."""
        scores = self.score(head, windows)
        if not self.cfg.gate_half_life or not scores.points:
            return scores.mean, scores.points
        k = torch.arange(len(windows), dtype=torch.float32)
        return scores.weighted(0.5 ** (k / self.cfg.gate_half_life)), scores.points

    def gate(self, candidate: Eagle3Head, windows: list[Window], source: tuple) -> GateResult:
        """Judge ``candidate`` against the live head on ``windows``, the slice named by
        ``source`` (the name keys the cached live score)."""
        live, n = self.live_acceptance(windows, source)
        cand, _ = self.gate_acceptance(candidate, windows)
        alpha = [round(a, 4) for a in self.last_alpha]  # the candidate's (evaluated last)
        c = self.cfg
        if n < c.gate_min_positions:
            res = GateResult(False, cand, live, n, f"held-out slice too small ({n} positions)")
        elif not cand > live + c.gate_margin:
            res = GateResult(False, cand, live, n, f"candidate {cand:.3f} does not beat live "
                                                   f"{live:.3f} + margin {c.gate_margin}")
        else:
            res = GateResult(True, cand, live, n, alpha=alpha,
                             live_alpha=[round(a, 4) for a in self.live_alpha])
        self.stats.gates += 1
        self.stats.gate_rejections += 0 if res.passed else 1
        if res.passed and cand >= live * (1 + c.rest_progress):
            self.on_progress()
        elif n >= c.gate_min_positions:  # refused, or passed by too little to train on for
            self.stats.gates_without_progress += 1
        self.stats.last_gate = {"passed": res.passed, "candidate": round(cand, 4),
                                "live": round(live, 4), "positions": n, "reason": res.reason}
        return res

    def propose_candidate(self) -> tuple[Eagle3Head, GateResult] | None:
        """A frozen copy of the current weights with the next version, if it passes the gate;
        with the prequential gate, the copy frozen last time, once the traffic since has come."""
        if self.cfg.gate_prequential:
            return self._propose_prequential()
        cand = self.frozen_candidate()
        return self._publish(cand, self.gate(cand, self.gate_windows(),
                                             ("held-out", self.store.holdout_added)))

    def frozen_candidate(self) -> Eagle3Head:
        """A frozen copy of the weights a candidate would have now: the trained ones, or their
        moving average (TrainerConfig.candidate_ema)."""
        cand = copy.deepcopy(self.head).eval()
        if self.average is not None:
            self.average.copy_into(cand)
        for p in cand.parameters():
            p.requires_grad_(False)
        return cand

    def _propose_prequential(self) -> tuple[Eagle3Head, GateResult] | None:
        if self.fresh.candidate is not None and not self.fresh.ready:
            return None  # its slice is still arriving; the weights train on meanwhile
        judged, windows, serial = self.fresh.candidate, self.fresh.windows, self.fresh.serial
        self.fresh.freeze(self.frozen_candidate())  # the next candidate, judged on what comes next
        if judged is None:
            return None
        return self._publish(judged, self.gate(judged, windows, ("fresh", serial)))

    def _publish(self, cand: Eagle3Head, res: GateResult) -> tuple[Eagle3Head, GateResult] | None:
        if not res.passed:
            log.info("gate: candidate not published: %s", res.reason)
            return None
        cand.version = self.next_version
        self.next_version += 1
        self.store.mark()  # what arrives from now on, no published head has trained on
        self.stats.candidates += 1
        return cand, res


def newest_windows(windows: list[Window], pairs: int) -> list[Window]:
    """The newest of ``windows`` (oldest first), newest first, until they hold ``pairs`` scored
    pairs: a gate's slice."""
    out, n = [], 0
    for w in reversed(windows):
        if n >= pairs:
            break
        out.append(w)
        n += w.scored_pairs
    return out
