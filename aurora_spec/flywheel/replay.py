"""Where the trainer keeps windows: the newest ones, a replay reservoir over all traffic, and a
held-out slice for the gate.

- ``recent``: the last N training windows (what traffic looks like now);
- ``reservoir``: a uniform sample over every training window ever seen (reservoir sampling,
  Vitter's algorithm R), the forgetting guard: a burst of one domain cannot push the others out;
- ``holdout``: the windows of 1 in ``holdout_every`` *requests* (one at a random place in each
  block of that many arrivals; or, without ``holdout_blocks``, those whose id hashes so), never
  trained on; the newest of them are the gate's held-out slice. Whole requests, not single
  windows: windows of one request share its prompt and wording, so a window whose neighbours
  were trained on scores far better than truly unseen traffic (measured: gate acceptance
  0.75-0.82 against 0.6 on held-out requests), and the gate would pass candidates that only
  memorised.
A batch mixes ``recent_ratio`` of newest windows with replay.

- ``unseen``: the newest windows (held-out or not) added since ``mark()``, at most
  ``unseen_pairs`` scored pairs: the trainer marks when it freezes a candidate, so no head it
  published has trained on them; judging two heads on them is a paired test on fresh traffic.
"""

from __future__ import annotations

import random
import zlib
from collections import OrderedDict, deque
from typing import TYPE_CHECKING

from aurora_spec.flywheel.batch import Window

if TYPE_CHECKING:
    from aurora_spec.drafters.eagle3_head import Eagle3Head


class WindowStore:
    def __init__(self, recent_windows: int = 64, reservoir_windows: int = 2048,
                 holdout_every: int = 8, holdout_windows: int = 32, seed: int = 0,
                 reservoir_bytes: int | None = None, unseen_pairs: int = 2048,
                 holdout_blocks: bool = True) -> None:
        self.recent: deque[Window] = deque(maxlen=recent_windows)
        self.reservoir: list[Window] = []
        self.max_windows = reservoir_windows
        self.reservoir_bytes = reservoir_bytes
        self._bytes_seen = 0
        self.holdout: deque[Window] = deque(maxlen=holdout_windows)
        self.holdout_every = holdout_every
        self.rng = random.Random(seed)
        self.windows_seen = 0  # training windows offered to the reservoir
        self.count = 0
        self.positions = 0  # training pairs ingested
        self.holdout_added = 0
        self.seed = seed
        self.unseen: deque[Window] = deque()
        self.unseen_pairs = unseen_pairs
        self._unseen_scored = 0
        # The side each recent request landed on, so that a change of holdout_every (the trainer
        # holds out more right after a traffic shift) never splits one request between sides.
        self._sides: OrderedDict[str, bool] = OrderedDict()
        # holdout_blocks: exactly one request of every holdout_every in arrival order, at a random
        # place in its block (own generator: the reservoir's draws stay as they were).
        self.holdout_blocks = holdout_blocks
        self._block_rng = random.Random(f"holdout:{seed}")
        self._block: list[bool] = []

    def held_out(self, request_id: str) -> bool:
        """Whether a request belongs to the gate's slice: its place in its block of arrivals (or
        a hash of its id) at the rate in force when its first window came, so every window of
        the request lands on the same side."""
        side = self._sides.get(request_id)
        if side is None:
            every = self.holdout_every
            if self.holdout_blocks:
                side = self._next_in_block(every)
            else:
                side = every > 0 and zlib.crc32(f"{self.seed}:{request_id}".encode()) % every == 0
            self._sides[request_id] = side
            if len(self._sides) > 4096:  # requests long finished
                self._sides.popitem(last=False)
        return side

    def _next_in_block(self, every: int) -> bool:
        """The side of the next new request: blocks of ``every`` arrivals, one held out in each.
        Why: a hash holds out 1 in ``every`` only on average; right after a shift the first new
        requests held out came after 0 to 20+ of them (geometric), and the gate judged on the old
        traffic meanwhile. Blocks bound that wait below 2 x ``every``."""
        if every <= 0:
            return False
        if not self._block or len(self._block) > every:  # a new block (or a smaller rate)
            self._block = [False] * every
            self._block[self._block_rng.randrange(every)] = True
        return self._block.pop()

    def mark(self) -> None:
        """From now on ``unseen`` collects the windows that arrive."""
        self.unseen.clear()
        self._unseen_scored = 0

    def _add_unseen(self, win: Window) -> None:
        if win.scored_pairs <= 0 or self.unseen_pairs <= 0:
            return
        self.unseen.append(win)
        self._unseen_scored += win.scored_pairs
        while self._unseen_scored - self.unseen[0].scored_pairs >= self.unseen_pairs:
            self._unseen_scored -= self.unseen.popleft().scored_pairs

    def add(self, win: Window) -> None:
        self.count += 1
        self._add_unseen(win)
        if self.held_out(win.request_id):
            if win.scored_pairs > 0:  # prompt-only windows score nothing: not kept at all
                self.holdout.append(win)
                self.holdout_added += 1
            return
        self.recent.append(win)
        self.positions += win.pairs
        self.windows_seen += 1
        self._bytes_seen += win.nbytes
        if len(self.reservoir) > self.reservoir_cap:  # windows grew: shrink uniformly
            del self.reservoir[self.rng.randrange(len(self.reservoir))]
        if len(self.reservoir) < self.reservoir_cap:
            self.reservoir.append(win)
        else:
            j = self.rng.randrange(self.windows_seen)
            if j < self.reservoir_cap:
                self.reservoir[j] = win

    @property
    def reservoir_cap(self) -> int:
        """Windows the reservoir holds: ``reservoir_windows``, or fewer so that windows of the
        mean size seen so far fit in ``reservoir_bytes``."""
        if not self.reservoir_bytes or not self.windows_seen:
            return self.max_windows
        mean = self._bytes_seen / self.windows_seen
        return max(16, min(self.max_windows, int(self.reservoir_bytes / mean)))

    @property
    def empty(self) -> bool:
        return not self.recent and not self.reservoir

    def sample(self, pairs: int, recent_ratio: float) -> list[Window]:
        """Windows totalling about ``pairs`` training pairs (each window at most once)."""
        chosen: list[Window] = []
        ids: set[int] = set()
        total, misses = 0, 0
        while total < pairs and misses < 8:
            pool = self.recent if (self.rng.random() < recent_ratio or not self.reservoir) \
                else self.reservoir
            if not pool:
                pool = self.reservoir or self.recent
            win = pool[self.rng.randrange(len(pool))]
            if id(win) in ids:
                misses += 1
                continue
            ids.add(id(win))
            chosen.append(win)
            total += win.pairs + len(win.br_tok)
        return chosen

    def holdout_slice(self) -> list[Window]:
        return list(self.holdout)

    def clear(self) -> None:
        self.recent.clear()
        self.reservoir.clear()
        self.holdout.clear()
        self._sides.clear()
        self._block = []
        self.mark()
        self.windows_seen = self.count = self.positions = self.holdout_added = 0
        self._bytes_seen = 0

    @property
    def nbytes(self) -> int:
        seen: dict[int, Window] = {}
        for w in (*self.recent, *self.reservoir, *self.holdout, *self.unseen):
            seen[id(w)] = w
        return sum(w.nbytes for w in seen.values())


class FreshSlice:
    """A frozen candidate and the windows that arrive after it was frozen, up to ``pairs``
    scored positions: neither it nor the live head (published before it was frozen) trained on
    them, so they are a held-out slice in time, of the newest traffic, that costs no training
    data (TrainerConfig.gate_prequential)."""

    def __init__(self, pairs: int) -> None:
        self.pairs = pairs
        self.candidate: Eagle3Head | None = None
        self.windows: list[Window] = []
        self.scored = 0
        self.serial = 0  # bumped at each freeze: names the slice for cached scores

    def freeze(self, candidate: Eagle3Head) -> None:
        self.candidate, self.windows, self.scored = candidate, [], 0
        self.serial += 1

    def clear(self) -> None:
        self.candidate, self.windows, self.scored = None, [], 0

    def add(self, win: Window) -> None:
        if self.candidate is not None and not self.ready and win.scored_pairs > 0:
            self.windows.append(win)
            self.scored += win.scored_pairs

    @property
    def ready(self) -> bool:
        """The candidate has a full slice to be judged on."""
        return self.candidate is not None and self.scored >= self.pairs
