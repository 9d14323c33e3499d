"""Block-by-block attention over packed windows equals dense attention over the same mask."""

from __future__ import annotations

import pytest
import torch

from aurora_spec.models.blocks import WindowBlocks
from aurora_spec.models.layers import attend


def packed_case(seed: int):
    """Queries and keys of 4 windows interleaved out of order (window 2 has keys but no
    queries), a random mask within windows, every query seeing at least one key."""
    gen = torch.Generator().manual_seed(seed)
    q_win = torch.tensor([0, 1, 0, 3, 3, 1, 0, 3, 1, 1, 0])
    k_win = torch.cat((q_win, torch.tensor([2, 3, 0, 0, 1, 2])))
    same = q_win[:, None] == k_win[None, :]
    mask = same & (torch.rand(len(q_win), len(k_win), generator=gen) < 0.6)
    mask[torch.arange(len(q_win)), torch.arange(len(q_win))] = True  # each query sees itself
    q = torch.randn(1, 6, len(q_win), 8, generator=gen, requires_grad=True)
    k = torch.randn(1, 2, len(k_win), 8, generator=gen, requires_grad=True)
    v = torch.randn(1, 2, len(k_win), 8, generator=gen, requires_grad=True)
    return q, k, v, mask, q_win, k_win


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_window_blocks_equal_dense_attention_and_its_gradients(seed):
    q, k, v, mask, q_win, k_win = packed_case(seed)
    blocks = WindowBlocks.from_mask(mask, q_win, k_win)
    assert blocks.q_index.shape == (4, 4)  # 4 windows, the longest with 4 queries
    dense = attend(q, k, v, mask[None, None])
    out = blocks.attend(q, k, v)
    torch.testing.assert_close(out, dense, atol=1e-6, rtol=1e-5)
    grads_dense = torch.autograd.grad(dense.square().sum(), (q, k, v))
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    for a, b in zip(grads, grads_dense):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_window_blocks_ignore_what_the_mask_allows_across_windows():
    q, k, v, mask, q_win, k_win = packed_case(0)
    leaky = mask | True  # every key allowed: blocks still keep windows apart
    out = WindowBlocks.from_mask(leaky, q_win, k_win).attend(q, k, v)
    same = q_win[:, None] == k_win[None, :]
    torch.testing.assert_close(out, attend(q, k, v, same[None, None]), atol=1e-6, rtol=1e-5)


def test_bfloat16_queries_come_back_in_bfloat16():
    q, k, v, mask, q_win, k_win = packed_case(0)
    out = WindowBlocks.from_mask(mask, q_win, k_win).attend(q.bfloat16(), k.bfloat16(),
                                                            v.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), attend(q, k, v, mask[None, None]), atol=3e-2,
                               rtol=3e-2)
