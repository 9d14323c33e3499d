"""Attention over packed sequences that never see each other, one block per sequence.

Training packs several windows (slices of different requests) into one row sequence, and a
mask keeps them apart. Dense attention over such a mask computes every cross-window score only
to mask it out: with 3-6 windows a batch, most of the work. ``WindowBlocks`` gathers each
window's queries and keys into a padded batch of its own, attends there, and scatters the
outputs back to the packed rows: the same result (the scores it skips are all masked), at a
fraction of the cost of the training-time test's attention (flywheel/losses.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aurora_spec.models.layers import attend


def _slots(group: torch.Tensor, blocks: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """For rows labelled by ``group`` (values in 0..blocks-1): each row's slot within its
    group (in row order), and the (blocks, width) index of the rows in each slot (padded with
    -1), width the largest group."""
    n = len(group)
    counts = torch.bincount(group, minlength=blocks)
    order = torch.argsort(group, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty(n, dtype=torch.long, device=group.device)
    slot[order] = torch.arange(n, device=group.device) - starts[group[order]]
    width = int(counts.max()) if n else 0
    index = torch.full((blocks, width), -1, dtype=torch.long, device=group.device)
    index[group, slot] = torch.arange(n, device=group.device)
    return slot, index, width


@dataclass(frozen=True)
class WindowBlocks:
    """A block-diagonal attention pattern: query i may see key j only where ``mask[i, j]`` and
    both belong to the same window. Build it with ``from_mask``; ``attend`` then runs the
    attention one window per batch entry."""

    q_index: torch.Tensor  # (W, Lq) packed query row in each slot (padding: row 0)
    k_index: torch.Tensor  # (W, Lk) packed key in each slot (padding: key 0)
    mask: torch.Tensor  # (W, 1, Lq, Lk) bool
    q_back: torch.Tensor  # (T,) each packed query's slot in the flattened (W * Lq) layout

    @staticmethod
    def from_mask(mask: torch.Tensor, q_window: torch.Tensor,
                  k_window: torch.Tensor) -> WindowBlocks:
        """``mask`` (T, S) bool over packed queries and keys; ``q_window`` (T,), ``k_window``
        (S,) their window indices. Entries of ``mask`` across windows are ignored: the result
        is dense attention over ``mask`` with those entries False (as training's masks are)."""
        both = torch.cat((q_window, k_window))
        blocks = int(both.max()) + 1 if len(both) else 0
        q_slot, q_index, lq = _slots(q_window, blocks)
        _, k_index, _ = _slots(k_window, blocks)
        q_pad, k_pad = q_index < 0, k_index < 0
        q_index, k_index = q_index.clamp(min=0), k_index.clamp(min=0)
        sub = mask[q_index[:, :, None], k_index[:, None, :]] & ~k_pad[:, None, :]
        # A padding query sees its block's first key: an all-masked row would give NaN (and
        # NaN gradients); its output is never read.
        sub[:, :, 0] |= q_pad
        return WindowBlocks(q_index, k_index, sub[:, None], q_window * lq + q_slot)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (1, Hq, T, D), k and v (1, Hkv, S, D) packed -> (1, Hq, T, D), as ``attend`` over
        the dense mask would give."""
        _, hq, _, d = q.shape
        w, lq = self.q_index.shape
        qb = q[0][:, self.q_index].transpose(0, 1)  # (W, Hq, Lq, D)
        kb = k[0][:, self.k_index].transpose(0, 1)
        vb = v[0][:, self.k_index].transpose(0, 1)
        if q.device.type == "cpu" and q.dtype != torch.float32:
            # CPU flash attention is slower in bfloat16 than in float32 at these sizes (its
            # backward 2x at 128 x 128): attend in float32, as autocast would not.
            with torch.autocast("cpu", enabled=False):
                out = attend(qb.float(), kb.float(), vb.float(), self.mask).to(q.dtype)
        else:
            out = attend(qb, kb, vb, self.mask)  # (W, Hq, Lq, D)
        return out.transpose(0, 1).reshape(hq, w * lq, d)[:, self.q_back][None]
