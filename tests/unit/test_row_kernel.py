"""The row kernel (models/row_kernel.c): F.linear's result, and a row's bits never depend on the
rows beside it, the thread count, or the loop order the row count picks."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from aurora_spec.models import row_kernel
from aurora_spec.models.cpu_linear import CpuLinear, packs
from aurora_spec.models.row_kernel import RowLinear, library, supports

pytestmark = pytest.mark.skipif(library() is None, reason="row kernel not built here (no C "
                                "compiler or no AVX-512; CPU linears use oneDNN)")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out_features", [96, 97, 5])  # full packed blocks, a partial one
def test_matches_f_linear(bias: bool, out_features: int) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, 64, generator=g)
    b = torch.randn(out_features, generator=g) if bias else None
    fast = RowLinear(w, b)
    for shape in [(1, 64), (1, 3, 64), (2, 3, 64), (9, 64), (70, 64), (0, 64)]:
        x = torch.randn(*shape, generator=g)
        out = fast(x)
        assert out.shape == (*shape[:-1], out_features)
        torch.testing.assert_close(out, F.linear(x, w, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(960, 576), (576, 1536), (3072, 576), (50, 48), (33, 20)])
def test_a_rows_result_does_not_depend_on_the_call(shape: tuple[int, int]) -> None:
    """What keeps verify logits equal to one-token decode logits: each row alone, in every
    prefix of a 40-row call (1-12 rows take one loop order, more rows the other), at any offset,
    on 1 or 2 threads, gives the same bits."""
    g = torch.Generator().manual_seed(1)
    fast = RowLinear(torch.randn(*shape, generator=g), torch.randn(shape[0], generator=g))
    x = torch.randn(40, shape[1], generator=g)
    full = fast(x)
    alone = torch.cat([fast(x[i:i + 1]) for i in range(len(x))])
    assert torch.equal(full, alone)
    for rows in (2, 3, 4, 5, 6, 7, 9, 11, 12, 13, 17, 25):
        assert torch.equal(fast(x[:rows]), full[:rows]), rows
        assert torch.equal(fast(x[7:7 + rows]), full[7:7 + rows]), rows
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(fast(x), full)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("shape", [(97, 64), (5, 64), (8192, 576), (33, 20)])
def test_bfloat16_copies_compute_the_rounded_weights_in_float32(shape: tuple[int, int]) -> None:
    """Draft heads' copies in bfloat16 (RowLinear bf16_weights): F.linear of the weights rounded
    to bfloat16, in float32, for partial blocks too; a row's bits still never depend on the
    rows beside it (both tile loop orders)."""
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(*shape, generator=g), torch.randn(shape[0], generator=g)
    fast = RowLinear(w, b, bf16_weights=True)
    assert fast.packed.dtype == torch.bfloat16 and fast.bf16_weights
    x = torch.randn(20, shape[1], generator=g)
    full = fast(x)
    rounded = F.linear(x, w.bfloat16().float(), b)
    torch.testing.assert_close(full, rounded, atol=1e-4, rtol=1e-5)
    assert (full - F.linear(x, w, b)).abs().max() > (full - rounded).abs().max()  # not float32
    alone = torch.cat([fast(x[i:i + 1]) for i in range(len(x))])
    assert torch.equal(full, alone)
    for rows in (3, 7, 13):
        assert torch.equal(fast(x[2:2 + rows]), full[2:2 + rows]), rows


def test_another_register_tile_gives_the_same_bits(tmp_path: Path) -> None:
    """row_kernel.c's tile height is a speed choice only: a 3-row tile, built beside the
    default one (12 rows with AVX-512, 6 with AVX2), computes every row count bit for bit the
    same."""
    other = library(tmp_path, "cc", ("RB=3",))
    assert other is not None and other.aurora_tile_rows() == 3
    assert library().aurora_tile_rows() in (6, 12)  # type: ignore[union-attr]
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(97, 576, generator=g), torch.randn(97, generator=g)
    default, narrow = RowLinear(w, b), RowLinear(w, b, lib=other)
    half, half_narrow = (RowLinear(w, b, lib=lib, bf16_weights=True) for lib in (None, other))
    for rows in (1, 5, 6, 7, 12, 13, 30):
        x = torch.randn(rows, 576, generator=g)
        assert torch.equal(default(x), narrow(x)), rows
        assert torch.equal(half(x), half_narrow(x)), rows


def test_refuses_what_it_cannot_run() -> None:
    assert not supports(torch.randn(8, 64, dtype=torch.bfloat16))
    assert not supports(torch.randn(8, 64, 2))
    with pytest.raises(ValueError, match="cannot run"):
        RowLinear(torch.randn(8, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="float32"):
        RowLinear(torch.randn(8, 64))(torch.randn(2, 64, dtype=torch.float64))


def test_cpu_linear_takes_the_row_kernel_for_float32_only() -> None:
    assert CpuLinear(torch.randn(8, 64)).kernel == "row kernel"
    assert CpuLinear(torch.randn(8, 64), use_row_kernel=False).kernel == "oneDNN"
    bf16 = "oneDNN" if packs(torch.bfloat16) else "row kernel (float32 copy)"
    assert CpuLinear(torch.randn(8, 64).bfloat16()).kernel == bf16
    assert CpuLinear(torch.randn(8, 20)).kernel == "row kernel"  # any in-features
    half = CpuLinear(torch.randn(8, 64), bf16_weights=True)
    assert half.kernel == "row kernel, bfloat16 weights" and half.bf16_weights
    assert CpuLinear(torch.randn(8, 64), use_row_kernel=False, bf16_weights=True).kernel == "oneDNN"


def test_build_is_cached_and_a_missing_compiler_is_a_logged_fallback(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    built = row_kernel._build(tmp_path, "cc")
    mtime = built.stat().st_mtime_ns
    assert row_kernel._build(tmp_path, "cc") == built and built.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [built.name]  # no scratch file left behind
    with caplog.at_level(logging.INFO, logger="aurora_spec.models.row_kernel"):
        assert library(tmp_path, str(tmp_path / "no-such-cc")) is None
    assert "oneDNN" in caplog.text


def test_a_failing_compile_leaves_nothing_half_written(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    fake = tmp_path / "bad-cc"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo bad-cc 1.0 && exit 0\n"
                    "echo 'error: no such target' >&2; exit 1\n")
    fake.chmod(0o755)
    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING, logger="aurora_spec.models.row_kernel"):
        assert library(cache, str(fake)) is None
    assert "no such target" in caplog.text
    assert not any(cache.iterdir())
