"""RMSNorm, the rotary embedding, attention and the MLP's activation as C calls
(models/row_ops.c): PyTorch's results to float32 rounding, a row's bits never depend on the
rows beside it or the thread count, and training keeps PyTorch's operations (and their
gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aurora_spec.models import row_ops
from aurora_spec.models.layers import (RMSNorm, RopeTable, apply_rope, rope_cos_sin,
                                       rope_inv_freq, rotate)

pytestmark = pytest.mark.skipif(row_ops.library() is None,
                                reason="row_ops.c not built here (no C compiler)")


def _rows_alone_and_together(fn, rows: int) -> None:
    """``fn(start, stop)``, the op on rows start..stop of its input: all rows, each 7th row
    alone, runs of rows at an offset, and all rows on 1 thread give the same bits. 300 rows of
    576 floats pass the size from which a call splits rows between threads."""
    full = fn(0, rows)
    assert torch.equal(torch.cat([fn(i, i + 1) for i in range(0, rows, 7)]), full[::7])
    for n in (2, 5, 12, 113):
        assert torch.equal(fn(3, 3 + n), full[3:3 + n]), n
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(fn(0, rows), full)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("offset", [0.0, 1.0])  # Llama, Gemma's (1 + weight)
@pytest.mark.parametrize("dim", [576, 64, 37])  # a row, a head, a ragged tail
def test_rms_norm_matches_torch_and_rows_are_independent(offset: float, dim: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, dim, generator=g) * 3
    w = torch.randn(dim, generator=g)
    ref = F.rms_norm(x, (dim,), w + offset, 1e-5)
    torch.testing.assert_close(row_ops.rms_norm(x, w, 1e-5, offset), ref, atol=1e-5, rtol=1e-5)
    _rows_alone_and_together(lambda a, b: row_ops.rms_norm(x[a:b], w, 1e-5, offset), len(x))
    assert row_ops.rms_norm(x[:0], w, 1e-5).shape == (0, dim)  # an empty call


@pytest.mark.parametrize("dim", [1536, 37])  # SmolLM2's MLP, a ragged tail (rows misaligned)
def test_silu_mul_matches_torch_and_rows_are_independent(dim: int) -> None:
    """silu(gate) * up from the fused gate/up output: PyTorch's to float32 rounding over the
    whole range a gate takes (and past exp's: +-100), each row's bits its own."""
    g = torch.Generator().manual_seed(4)
    gu = torch.randn(300, 2 * dim, generator=g) * 4
    gu[0, :dim] = torch.linspace(-100, 100, dim)
    gate, up = gu.chunk(2, dim=-1)
    torch.testing.assert_close(row_ops.silu_mul(gu), F.silu(gate) * up, atol=1e-6, rtol=2e-6)
    _rows_alone_and_together(lambda a, b: row_ops.silu_mul(gu[a:b]), len(gu))
    with pytest.raises(ValueError, match="gate and up"):
        row_ops.silu_mul(gu[:, :-1])


@pytest.mark.parametrize("dim", [576, 37])
def test_add_rms_norm_is_the_add_then_the_norm(dim: int) -> None:
    """The residual add's bits are x + y's, and the norm's are rms_norm's of that sum."""
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(300, dim, generator=g), torch.randn(300, dim, generator=g)
    w = torch.randn(dim, generator=g)
    total, normed = row_ops.add_rms_norm(x, y, w, 1e-5)
    assert torch.equal(total, x + y)
    assert torch.equal(normed, row_ops.rms_norm(x + y, w, 1e-5))
    _rows_alone_and_together(lambda a, b: row_ops.add_rms_norm(x[a:b], y[a:b], w, 1e-5)[1],
                             len(x))
    with pytest.raises(ValueError, match="do not fit"):
        row_ops.add_rms_norm(x, y[:, :-1], w, 1e-5)


def test_rope_matches_rotate_and_rows_are_independent() -> None:
    """The fused q/k/v output of one layer (9 q heads, 3 k, 3 v, head_dim 64): q and k rotate in
    place as layers.rotate rotates them; v is untouched."""
    g = torch.Generator().manual_seed(1)
    heads, d, rows = 12, 64, 300
    qkv = torch.randn(rows, (heads + 3) * d, generator=g)
    table = RopeTable(rope_inv_freq(d, 10000.0), 2048, torch.float32, torch.device("cpu"))
    positions = torch.randint(0, 2048, (1, rows), generator=g)
    cos, sin = table.lookup(positions)  # (1, 1, rows, d)
    ref = rotate(qkv[None, :, :heads * d].reshape(1, rows, heads, d).transpose(1, 2), cos, sin)

    def fn(start: int, stop: int) -> torch.Tensor:
        out = qkv[start:stop].clone()
        row_ops.rope_(out, heads, d, cos[..., start:stop, :], sin[..., start:stop, :])
        return out

    out = fn(0, rows)
    torch.testing.assert_close(out[:, :heads * d].view(rows, heads, d).transpose(0, 1),
                               ref[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(out[:, heads * d:], qkv[:, heads * d:])
    _rows_alone_and_together(fn, rows)
    with pytest.raises(ValueError, match="does not fit"):
        row_ops.rope_(qkv[:10], heads, d, cos[..., :9, :], sin[..., :9, :])
    with pytest.raises(ValueError, match="does not fit"):
        row_ops.rope_(qkv[:, :100], heads, d, cos, sin)  # not contiguous


def test_rope_at_matches_apply_rope() -> None:
    """The draft head's rotation, angles from positions: layers.apply_rope's result."""
    g = torch.Generator().manual_seed(2)
    heads, d, rows = 6, 64, 40
    inv = rope_inv_freq(d, 500000.0)
    qkv = torch.randn(2, rows // 2, (heads + 2) * d, generator=g)
    positions = torch.randint(0, 8192, (2, rows // 2), generator=g)
    cos, sin = rope_cos_sin(positions, inv, torch.float32)
    ref = apply_rope(qkv[..., :heads * d].reshape(2, rows // 2, heads, d).transpose(1, 2),
                     cos, sin)
    out = qkv.clone()
    row_ops.rope_at_(out, heads, d, positions, inv)
    torch.testing.assert_close(out[..., :heads * d].view(2, rows // 2, heads, d).transpose(1, 2),
                               ref, atol=2e-5, rtol=1e-5)
    assert torch.equal(out[..., heads * d:], qkv[..., heads * d:])
    alone = qkv[1:, 3:4].clone()
    row_ops.rope_at_(alone, heads, d, positions[1:, 3:4], inv)
    assert torch.equal(alone, out[1:, 3:4])


def test_rms_norm_module_takes_c_only_without_autograd() -> None:
    norm = RMSNorm(576, 1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 3, 576)
    with torch.inference_mode():
        assert row_ops.applies(x)
        assert torch.equal(norm(x), row_ops.rms_norm(x, norm.weight, 1e-5))
    assert not row_ops.applies(x)  # autograd on: PyTorch's operations, gradients flow
    x.requires_grad_(True)
    norm(x).sum().backward()
    assert x.grad is not None and norm.weight.grad is not None
    assert not row_ops.applies(x.detach().double())


def _reference_attention(qkv: torch.Tensor, heads: tuple[int, int, int], k_cache: torch.Tensor,
                         v_cache: torch.Tensor, start: int, kv_len: int,
                         mask: torch.Tensor, scale: float) -> torch.Tensor:
    """What transformer.Block._attend does with already-rotated q and k: the slow reference."""
    nq, nkv, d = heads
    b, t, _ = qkv.shape
    grid = qkv.view(b, t, -1, d).transpose(1, 2)
    k_cache[:, :, start:start + t] = grid[:, nq:nq + nkv]
    v_cache[:, :, start:start + t] = grid[:, nq + nkv:nq + 2 * nkv]
    attn = F.scaled_dot_product_attention(grid[:, :nq], k_cache[:, :, :kv_len],
                                          v_cache[:, :, :kv_len], attn_mask=mask, scale=scale,
                                          enable_gqa=True)
    return attn.transpose(1, 2).reshape(b, t, nq * d)


def _no_rotation(rows: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos 1, sin 0: attend's rotation leaves q and k as they are."""
    return torch.ones(1, 1, rows, d), torch.zeros(1, 1, rows, d)


@pytest.mark.parametrize("d", [64, 128, 96])
def test_attend_matches_sdpa_and_a_token_does_not_depend_on_its_neighbours(d: int) -> None:
    """A 5-token tree verify over a 40-position cache (9 query heads over 3 key/value heads, as
    SmolLM2): sdpa's result, the keys and values written where sdpa's path writes them, and each
    token's bits the same alone, with the others, and with masked positions past its keys. Head
    sizes 64 and 128 take the kernel's register paths (scores eight keys at a time, weighted
    values in registers), 96 its loops; 45 keys with the others and 52 alone put the last keys
    in the scores' tail in one call and in a block of eight in the other: the same bits."""
    g = torch.Generator().manual_seed(3)
    heads, (nq, nkv), cap, start, t = (9, 3, d), (9, 3), 64, 40, 5
    qkv = torch.randn(1, t, (nq + 2 * nkv) * d, generator=g)
    cache = torch.randn(2, 1, nkv, cap, d, generator=g)
    allowed = torch.ones(t, start + t, dtype=torch.bool)
    allowed[:, start:] = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0],
                                       [1, 1, 0, 1, 0], [1, 0, 1, 0, 1]], dtype=torch.bool)
    mask = torch.zeros(1, 1, t, start + t).masked_fill_(~allowed, float("-inf"))
    k_ref, v_ref = cache[0].clone(), cache[1].clone()
    ref = _reference_attention(qkv, heads, k_ref, v_ref, start, start + t, mask, 0.125)
    k, v = cache[0].clone(), cache[1].clone()
    out = row_ops.attend(qkv.clone(), heads, *_no_rotation(t, d), k, v, start + t, mask, 0.125,
                         start=start)
    assert out is not None
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    for i in range(t):  # token i alone, its keys at its own position, 7 masked positions after
        wide = torch.full((1, 1, 1, start + t + 7), float("-inf"))
        wide[..., :start + t] = mask[:, :, i:i + 1]
        k1, v1 = k.clone(), v.clone()
        one = row_ops.attend(qkv[:, i:i + 1].clone(), heads, *_no_rotation(1, d), k1, v1,
                             start + t + 7, wide, 0.125, start=start + i)
        assert one is not None and torch.equal(one[0, 0], out[0, i]), i


def test_attend_packed_batch_equals_each_request_alone() -> None:
    """A ragged batch (transformer.PackedRows: request 0 with 3 tokens after 10 cached, request 1
    with 1 token after 20) gives each token the bits it gets in its own request's call."""
    g = torch.Generator().manual_seed(4)
    heads, (nq, nkv, d), cap = (4, 2, 16), (4, 2, 16), 32
    k = torch.randn(2, nkv, cap, d, generator=g)
    v = torch.randn(2, nkv, cap, d, generator=g)
    qkv = torch.randn(1, 4, (nq + 2 * nkv) * d, generator=g)
    lens, sizes, t, kv_len = (10, 20), (3, 1), 3, 23
    mask = torch.full((2, 1, t, kv_len), float("-inf"))
    mask[:, :, :, 0] = 0.0  # padded grid rows see key 0 (as the runner builds it)
    mask[0, 0, :3, :13] = torch.zeros(3, 13).masked_fill_(
        torch.ones(3, 13, dtype=torch.bool).tril_(10).logical_not(), float("-inf"))
    mask[1, 0, :1, :21] = 0.0
    tokens = (torch.tensor([0, 0, 0, 1]), torch.tensor([10, 11, 12, 20]),
              torch.tensor([0, 1, 2, 3]))
    kb, vb = k.clone(), v.clone()
    out = row_ops.attend(qkv.clone(), heads, *_no_rotation(4, d), kb, vb, kv_len, mask, 0.25,
                         tokens=tokens)
    assert out is not None
    for r, (n, size, first) in enumerate(zip(lens, sizes, (0, 3), strict=True)):
        kr, vr = k[r:r + 1].clone(), v[r:r + 1].clone()
        alone = row_ops.attend(qkv[:, first:first + size].clone(), heads,
                               *_no_rotation(size, d), kr, vr, n + size,
                               mask[r:r + 1, :, :size, :n + size].contiguous(), 0.25, start=n)
        assert alone is not None and torch.equal(alone[0], out[0, first:first + size]), r
        assert torch.equal(kr[0], kb[r]) and torch.equal(vr[0], vb[r]), r


def test_attend_refuses_what_does_not_fit_and_touches_nothing() -> None:
    qkv = torch.randn(1, 2, 8 * 16)
    k, v = torch.zeros(1, 2, 8, 16), torch.zeros(1, 2, 8, 16)
    cos, sin = torch.full((1, 1, 2, 16), 2.0), torch.ones(1, 1, 2, 16)
    before = qkv.clone()
    for mask, kv_len in ((torch.zeros(1, 1, 2, 5, dtype=torch.float64), 5),  # a double mask
                         (torch.zeros(1, 1, 2, 9), 9)):  # more keys than the cache holds
        assert row_ops.attend(qkv, (4, 2, 16), cos, sin, k, v, kv_len, mask, 1.0) is None
    assert torch.equal(qkv, before) and not k.any()
