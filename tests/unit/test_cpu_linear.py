"""The CPU linear (cpu_linear.py), on oneDNN and on the row kernel, against F.linear, and its
batch invariance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aurora_spec.models.cpu_linear import CpuLinear, packed_kernels_available, packs, time_kernels

pytestmark = pytest.mark.skipif(not packed_kernels_available(),
                                reason="this PyTorch build has no oneDNN packed linear")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("row", [False, True], ids=["oneDNN", "row-kernel-where-built"])
def test_matches_f_linear(dtype: torch.dtype, bias: bool, row: bool) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g).to(dtype)
    b = torch.randn(96, generator=g).to(dtype) if bias else None
    fast = CpuLinear(w, b, use_row_kernel=row)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for shape in [(1, 1, 64), (1, 2, 64), (1, 3, 64), (2, 3, 64), (1, 9, 64), (40, 64)]:
        x = torch.randn(*shape, generator=g).to(dtype)
        out = fast(x)
        assert out.shape == (*shape[:-1], 96)
        torch.testing.assert_close(out.float(), F.linear(x, w, b).float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("shape", [(960, 576), (576, 1536), (3072, 576)])
@pytest.mark.parametrize("row", [False, True], ids=["oneDNN", "row-kernel-where-built"])
def test_a_rows_result_does_not_depend_on_the_batch(shape: tuple[int, int], row: bool) -> None:
    """What keeps verify logits equal to one-token decode logits (SmolLM2's layer shapes)."""
    g = torch.Generator().manual_seed(1)
    fast = CpuLinear(torch.randn(*shape, generator=g), use_row_kernel=row)
    x = torch.randn(16, shape[1], generator=g)
    full = fast(x)
    for rows in (1, 2, 3, 4, 5, 8):
        assert torch.equal(fast(x[:rows]), full[:rows]), rows


@pytest.mark.skipif(packs(torch.bfloat16), reason="oneDNN packs bfloat16 on this CPU")
@pytest.mark.parametrize("row", [False, True], ids=["oneDNN", "row-kernel-where-built"])
def test_bfloat16_without_a_bfloat16_kernel_runs_a_float32_copy(row: bool) -> None:
    """On a CPU where oneDNN cannot pack bfloat16 (AVX2 only), a bfloat16 layer is served by an
    exact float32 copy: bfloat16 in and out, every row's bits independent of the call."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(576, 1536, generator=g).bfloat16()
    fast = CpuLinear(w, use_row_kernel=row)
    assert fast.kernel.endswith("(float32 copy)")
    x = torch.randn(16, 1536, generator=g).bfloat16()
    full = fast(x)
    assert full.dtype == torch.bfloat16
    torch.testing.assert_close(full, F.linear(x.float(), w.float()).bfloat16())
    for rows in (1, 2, 3, 4, 5, 8):
        assert torch.equal(fast(x[:rows]), full[:rows]), rows


def test_time_kernels_times_both_kernels_over_all_row_counts() -> None:
    g = torch.Generator().manual_seed(2)
    weights = [torch.randn(64, 32, generator=g), torch.randn(32, 64, generator=g)]
    t = time_kernels(weights, rows=(1, 3), repeats=3)
    assert t.rows == (1, 3) and t.plain_ms > 0 and t.packed_ms > 0
    assert t.packed_wins == (t.packed_ms < t.plain_ms)
    assert t.packed_bf16_ms is None and t.fastest in ("F.linear", "packed")


def test_draft_kernels_are_the_fastest_of_three_where_bfloat16_copies_run() -> None:
    """runtime.draft_kernels times bfloat16 copies beside float32 ones for float32 heads
    (where the row kernel builds) and takes whichever of the three is fastest."""
    from aurora_spec.models import row_kernel

    g = torch.Generator().manual_seed(2)
    weights = [torch.randn(64, 32, generator=g), torch.randn(32, 64, generator=g)]
    t = time_kernels(weights, rows=(1, 3), repeats=3, bf16_weights=True)
    if row_kernel.library() is None:
        assert t.packed_bf16_ms is None
        return
    assert t.packed_bf16_ms is not None and t.packed_bf16_ms > 0
    times = {"F.linear": t.plain_ms, "packed": t.packed_ms, "packed bf16": t.packed_bf16_ms}
    assert t.fastest == min(times, key=lambda k: times[k])
    bf16 = [w.bfloat16() for w in weights]  # a bfloat16 head has no float32 weights to round
    assert time_kernels(bf16, rows=(1,), repeats=2, bf16_weights=True).packed_bf16_ms is None


def test_a_bfloat16_head_is_timed_beside_the_float32_kernels_when_asked() -> None:
    """``--draft-dtype auto`` on a CPU with native bfloat16 times a bfloat16 copy of the head
    beside float32's kernels (runtime.draft_kernels) and serves whichever is fastest."""
    g = torch.Generator().manual_seed(2)
    weights = [torch.randn(64, 32, generator=g), torch.randn(32, 64, generator=g)]
    assert time_kernels(weights, rows=(1, 3), repeats=2).bf16_head_ms is None
    t = time_kernels(weights, rows=(1, 3), repeats=3, bf16_weights=True, bf16_head=True)
    assert t.bf16_head_ms is not None and t.bf16_head_ms > 0
    times = {"F.linear": t.plain_ms, "packed": t.packed_ms, "bf16 head": t.bf16_head_ms}
    if t.packed_bf16_ms is not None:
        times["packed bf16"] = t.packed_bf16_ms
    assert t.fastest == min(times, key=lambda k: times[k])
    bf16 = [w.bfloat16() for w in weights]  # already bfloat16: nothing else to time
    assert time_kernels(bf16, rows=(1,), repeats=2, bf16_head=True).bf16_head_ms is None
