"""When the online trainer rests: it stops stepping once candidates stop beating the live head,
and wakes on evidence that training has something to gain again (TrainerConfig.rest_*).

Why rest at all: on 2 cores a sharing trainer's step is taken from serving's second thread
(~25-30% of serving's tokens/s), so a head that stopped improving should be trained rarely.
The evidence that wakes it: the live head's served acceptance (from the traces, all traffic)
falling, the draft vocabulary covering too few of the tokens emitted since the rest (new
tokens), its held-out acceptance on requests held out since the rest falling, or enough new
training windows (a probe, which one gate without progress ends; a coverage wake is one too,
TrainerConfig.rest_coverage_probe).
A mixin of ``Trainer`` (flywheel/trainer.py): it reads the trainer's store, live head, vocabulary
and stats, and keeps its own state.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aurora_spec.drafters.eagle3_head import Eagle3Head
    from aurora_spec.flywheel.batch import Window
    from aurora_spec.flywheel.config import TrainerConfig
    from aurora_spec.flywheel.replay import WindowStore
    from aurora_spec.flywheel.trainer import TrainerStats
    from aurora_spec.flywheel.vocab import VocabBuilder

log = logging.getLogger(__name__)


class Resting:
    if TYPE_CHECKING:  # what the mixin reads from the Trainer
        cfg: TrainerConfig
        store: WindowStore
        live: Eagle3Head
        head: Eagle3Head
        vocab: VocabBuilder
        stats: TrainerStats

        def offline_acceptance(self, head: Eagle3Head, windows: list[Window] | None = None,
                               depth: int | None = None) -> tuple[float, int]: ...

    def _init_rest(self, cfg: TrainerConfig) -> None:
        self.resting = False
        # The live head's acceptance on the whole held-out slice at rest (None: not known yet)
        self._rest_level: float | None = 0.0
        self._rest_windows = 0  # store.windows_seen when it rested
        self._rest_seen = 0  # vocab.seen (emitted tokens) when it rested
        self._checked_holdout = 0  # store.holdout_added at the last wake check
        self._since_rest = (0.0, 0)  # (accepted tokens, draft points) held out since the rest
        # The live head's own accepted tokens per drafting step, newest served steps (all traffic)
        self._served: deque[int] = deque(maxlen=max(cfg.rest_wake_steps, 1))
        self._served_since_rest = 0
        self._served_level: float | None = None  # ... their mean at rest (None: not known yet)
        self._served_drop_seen = False  # a fall seen in one window, to confirm in the next
        self._rest_needs = cfg.rest_after_rejections  # judged gates without a pass before a rest
        self.probing = False  # woke on new windows or coverage alone, no gate with progress since

    def maybe_rest(self) -> bool:
        """Stop training (``resting``) after ``rest_after_rejections`` judged gates in a row
        without progress, i.e. without a candidate better by ``rest_progress`` (one after a
        probe, see ``maybe_wake``); returns True when it just started resting."""
        c, s = self.cfg, self.stats
        if (self.resting or not c.rest_after_rejections
                or s.gates_without_progress < self._rest_needs):
            return False
        # The baseline a held-out wake compares with: the whole held-out slice (tens of
        # requests), not the gate's newest few, whose domain mix alone swings the score by 20% on
        # mixed traffic.
        self._start_rest(self.offline_acceptance(self.live, self.store.holdout_slice())[0])
        log.info("trainer resting for %d new windows: %d candidates in a row did not beat the live"
                 " head by %.0f%% (held-out acceptance %.3f)", self.rest_windows,
                 s.gates_without_progress, 100 * c.rest_progress, self._rest_level)
        return True

    def _start_rest(self, held_out_level: float | None) -> None:
        """Rest from now; a level left None is measured on the first traffic of the rest."""
        self.resting = True
        self.probing = False
        self._rest_level = held_out_level
        self._rest_windows = self.store.windows_seen
        self._rest_seen = self.vocab.seen  # emitted tokens counted when it rested
        self._checked_holdout = self.store.holdout_added
        self._since_rest = (0.0, 0)
        enough = len(self._served) >= max(self.cfg.rest_wake_steps // 2, 1)
        self._served_level = self.served_acceptance if enough else None
        self._served_since_rest = 0
        self._served_drop_seen = False
        self.stats.rests += 1
        self.stats.rests_since_pass += 1

    @property
    def rest_windows(self) -> int:
        """New training windows a rest lasts without other evidence: rest_min_windows, doubled
        for each rest since a gate with progress (a head that stopped improving is trained
        less and less often), at most rest_max_windows."""
        c = self.cfg
        doublings = max(self.stats.rests_since_pass - 1, 0)
        return min(c.rest_min_windows << min(doublings, 30), c.rest_max_windows)

    def on_progress(self) -> None:
        """A judged gate found progress. After a wake on evidence (or with probe_progress_rewind
        0) training goes on: the backoff starts over and it takes rest_after_rejections gates
        without progress to rest. In a probe it probes on: one gate without progress ends it and
        the next rest is probe_progress_rewind doublings shorter than the last."""
        s, rewind = self.stats, self.cfg.probe_progress_rewind
        if self.probing and rewind > 0:
            s.gates_without_progress = 0
            s.rests_since_pass = max(s.rests_since_pass - rewind, 0)
            s.probe_progress += 1
            return
        self.reset_backoff()

    def reset_backoff(self) -> None:
        """Train as a trainer that has not rested: no probe, the backoff at rest_min_windows,
        rest_after_rejections gates without progress before the next rest."""
        self.stats.gates_without_progress = 0
        self.stats.rests_since_pass = 0
        self._rest_needs = self.cfg.rest_after_rejections
        self.probing = False

    def maybe_wake(self) -> bool:
        """While resting: wake on new evidence (see TrainerConfig.rest_*); True when it woke."""
        if not self.resting:
            return False
        c = self.cfg
        reason, kind = self._served_drop(), "served"
        if not reason:
            reason = self._coverage_fall()
            kind = "coverage"
        if not reason and self.store.holdout_added != self._checked_holdout:  # new held-out
            live, n = self._acceptance_since_rest()
            if n >= c.gate_positions:
                if self._rest_level is None:  # resting from the start: this is the level
                    self._rest_level, self._since_rest = live, (0.0, 0)
                elif live < self._rest_level * (1 - c.rest_wake_drop):
                    reason = f"held-out acceptance fell from {self._rest_level:.3f} to {live:.3f}"
                    kind = "held-out"
        if not reason and self.store.windows_seen - self._rest_windows >= self.rest_windows:
            reason, kind = f"{self.rest_windows} new training windows", "windows"
        if not reason:
            return False
        self.resting = False
        self.stats.gates_without_progress = 0
        # Nothing says the traffic changed: one gate without a better candidate ends the probe.
        probe = kind == "windows" or (kind == "coverage" and c.rest_coverage_probe)
        self._rest_needs = 1 if probe else c.rest_after_rejections
        self.probing = probe
        self.stats.wakes += 1
        self.stats.wake_kinds[kind] = self.stats.wake_kinds.get(kind, 0) + 1
        self.stats.last_wake = reason
        log.info("trainer awake: %s", reason)
        return True

    @property
    def steps_before_gate(self) -> int:
        """Optimizer steps between candidates: publish_every, or probe_publish_every while a
        probe has not made progress yet."""
        c = self.cfg
        return c.probe_publish_every if self.probing and c.probe_publish_every > 0 \
            else c.publish_every

    def _served_drop(self) -> str:
        """Why to wake when the live head's served acceptance over the newest rest_wake_steps
        steps (all of them since the rest) fell by rest_wake_drop of its level at rest, and
        again over the next rest_wake_steps (a fall in one window only is taken for noise); "".

        Why twice: on mixed traffic the mean over 256 steps (~9 requests) swings with the mix
        of the requests in it; one such swing of 25% woke a resting trainer near the end of a
        day-0 run, with no change in the traffic (docs/results/day0.md, "Day 0"), and every wake
        costs serving its second thread. A real shift stays: confirming it costs one more window."""
        n = self.cfg.rest_wake_steps
        if not n or self._served_since_rest < n:
            return ""
        now = self.served_acceptance or 0.0
        if self._served_level is None:  # not enough served steps at rest: these set the level
            self._served_level, self._served_since_rest = now, 0
            return ""
        if now >= self._served_level * (1 - self.cfg.rest_wake_drop):
            self._served_drop_seen = False
            return ""
        if not self._served_drop_seen:  # confirm on the next rest_wake_steps steps
            self._served_drop_seen, self._served_since_rest = True, 0
            return ""
        return f"served acceptance fell from {self._served_level:.3f} to {now:.3f} per step"

    def _coverage_fall(self) -> str:
        """Why to wake when the draft vocabulary covers less than rest_wake_coverage of the
        tokens emitted since the rest (at least rest_coverage_tokens of them; the newest
        vocab_coverage_window), ""; new tokens: learn them.

        Why not the coverage of the whole recent window, which the vocabulary was rebuilt on:
        that one starts near 1.0 after every rebuild and falls to the out-of-sample level with no
        change in the traffic (TrainerConfig.rest_wake_coverage)."""
        c = self.cfg
        if not c.rest_coverage_since_rest:  # the rule before 97b4105, for side-by-side runs
            now = self.vocab.coverage(self.head.t2d)
            low = len(self.vocab.recent) >= c.vocab_min_tokens and now < c.rest_wake_coverage
            return f"draft vocabulary coverage fell to {now:.3f}" if low else ""
        since = self.vocab.seen - self._rest_seen
        if since < max(c.rest_coverage_tokens, 1):
            return ""
        now = self.vocab.coverage(self.head.t2d, newest=since)
        if now >= c.rest_wake_coverage:
            return ""
        return (f"draft vocabulary coverage {now:.3f} of the "
                f"{min(since, len(self.vocab.recent))} tokens emitted since the rest")

    @property
    def served_acceptance(self) -> float | None:
        """The live head's own accepted tokens per drafting step over the newest served steps
        (None before any)."""
        return sum(self._served) / len(self._served) if self._served else None

    def _acceptance_since_rest(self) -> tuple[float, int]:
        """The live head's acceptance on the held-out windows added since it rested, scored once
        each as they arrive: a resting trainer's checks must cost serving next to nothing."""
        new = min(self.store.holdout_added - self._checked_holdout, self.cfg.holdout_windows)
        self._checked_holdout = self.store.holdout_added
        if new > 0:
            acc, n = self.offline_acceptance(self.live, self.store.holdout_slice()[-new:])
            total, count = self._since_rest
            self._since_rest = (total + acc * n, count + n)
        total, count = self._since_rest
        return (total / count if count else 0.0), count
