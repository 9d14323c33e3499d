"""RMSNorm and the rotary embedding as C calls (models/row_ops.c): PyTorch's results to float32
rounding, a row's bits never depend on the rows beside it or the thread count, and training
keeps PyTorch's operations (and their gradients)."""

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
