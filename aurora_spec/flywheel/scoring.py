"""Offline acceptance: how many draft tokens a head would get accepted on recorded traffic.

The gate's measure (and the paired rollback test's, and ``aurora train``'s held-out figure): each
scored position of the windows drafts a greedy chain of ``depth`` tokens (or the tree serving
drafts: top ``width`` at depth 1) from the target hidden states the traces hold, and counts how
many match what the target emitted. No target forward: the windows carry everything. Per window
as well as in all, so the gate can weigh its slice's windows by recency
(``TrainerConfig.gate_half_life``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from aurora_spec.drafters.eagle3_head import Eagle3Head
from aurora_spec.flywheel.batch import Window, pack_windows
from aurora_spec.flywheel.losses import Embedder, acceptance_lengths


@dataclass(frozen=True)
class Scores:
    mean: float  # accepted draft tokens per draft point (0.0 with no point)
    points: int  # draft points scored
    alpha: tuple[float, ...]  # per-depth acceptance given the depth before, Laplace-smoothed
    per_window: torch.Tensor  # (len(windows), 2): accepted tokens and draft points per window

    def weighted(self, weights: torch.Tensor) -> float:
        """The mean with window i's points weighing ``weights[i]``."""
        totals, points = self.per_window.unbind(1)
        return float((weights * totals).sum() / (weights * points).sum().clamp(min=1e-9))


@torch.no_grad()
def score_windows(head: Eagle3Head, windows: list[Window], embed: Embedder, depth: int,
                  budget: int, device: torch.device,
                  autocast: Callable[[], AbstractContextManager], width: int = 1) -> Scores:
    """Score ``head`` on ``windows`` in batches of about ``budget`` positions, drafting chains
    (``width`` 1) or the top-``width`` trees serving drafts."""
    was_training = head.training
    head.eval()
    reached = [0] * (depth + 1)  # draft points whose chain got past depth d
    per_window = torch.zeros(len(windows), 2)

    def run(ws: list[Window], at: list[int]) -> None:
        batch = pack_windows(ws, with_branches=False).to(device)
        if not batch.n_committed:
            return
        with autocast():
            lengths = acceptance_lengths(head, batch, embed, depth, width)
        scored = batch.scored_c  # only where serving drafts
        lengths = lengths[scored].cpu()
        for d in range(depth + 1):
            reached[d] += int((lengths >= d).sum())
        idx = torch.tensor(at)[batch.win_c[scored].cpu()]
        per_window.index_add_(0, idx, torch.stack((lengths.float(), torch.ones(len(lengths))), 1))

    chunk: list[Window] = []
    where: list[int] = []
    size = 0
    for i, w in enumerate(windows):
        if not w.scored_pairs:  # prompt rows alone, never drafted (6-25% of held-out rows)
            continue
        chunk.append(w)
        where.append(i)
        size += w.pairs
        if size >= budget:
            run(chunk, where)
            chunk, where, size = [], [], 0
    if chunk:
        run(chunk, where)
    head.train(was_training)
    total, n = per_window.sum(0).tolist()
    # Laplace's rule, (hits + 1) / (tries + 2): these seed the draft-length policy, which only
    # revises a depth it drafts, so a 0 from a handful of held-out chains (none got that deep)
    # would rule that depth out for good; with many tries it is the measured rate.
    alpha = tuple((reached[d] + 1) / (reached[d - 1] + 2) for d in range(1, depth + 1))
    return Scores(total / n if n else 0.0, int(n), alpha, per_window)
