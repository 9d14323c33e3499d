"""An exponential moving average of the draft head's weights (Polyak averaging).

Why: the trainer's weights move with every noisy step on a few hundred positions, and a candidate
frozen at one step of many can be a bad moment of them: on chat -> SQL -> code, candidates 25 steps
apart scored 0.23-0.31 drafted tokens per position on the gate's slice where the live head, an
earlier candidate that had passed, scored 0.33-0.37. The average of the last ~1 / (1 - decay)
steps' weights is a smoother candidate; the optimizer still steps the raw weights.
"""

from __future__ import annotations

import torch

from aurora_spec.drafters.eagle3_head import Eagle3Head, carry_rows


class WeightAverage:
    def __init__(self, head: Eagle3Head, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.reset(head)

    def reset(self, head: Eagle3Head) -> None:
        """Start over from ``head``'s weights (a new start, a rollback)."""
        self.avg = [p.detach().clone() for p in head.parameters()]

    @torch.no_grad()
    def update(self, head: Eagle3Head) -> None:
        """Fold in the weights after an optimizer step."""
        torch._foreach_lerp_(self.avg, [p.detach() for p in head.parameters()], 1.0 - self.decay)

    @torch.no_grad()
    def remap_rows(self, head: Eagle3Head, old_rows: torch.Tensor) -> None:
        """The draft vocabulary was rebuilt: the lm_head's averaged row i comes from old row
        ``old_rows[i]``; a token new to the vocabulary (-1) takes ``head``'s row as it is."""
        i = next(j for j, p in enumerate(head.parameters()) if p is head.lm_head.weight)
        self.avg[i] = carry_rows(self.avg[i], old_rows, fill=head.lm_head.weight)

    @torch.no_grad()
    def copy_into(self, head: Eagle3Head) -> None:
        """Give ``head`` (a copy of the trained head, same vocabulary) the averaged weights."""
        for p, a in zip(head.parameters(), self.avg, strict=True):
            p.copy_(a)
