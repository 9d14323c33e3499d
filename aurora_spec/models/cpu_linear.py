"""Linear layers in the weight layouts that CPU kernels read fastest, row-independent.

Why: a decode or verify step on CPU is one pass over all weights, and ``F.linear`` (MKL) reads
the (out, in) layout slowly for a few rows; worse for speculation, its result for a row depends
on how many rows share the call, so verify logits would not equal one-token decode logits. Two
kernels here keep a row's result independent of the call (tests/unit/test_cpu_linear.py,
tests/unit/test_row_kernel.py):

- float32 where it builds: the row kernel (row_kernel.py), as fast as MKL for one row or faster,
  and reading the weights once for up to 12 rows (2 threads, SmolLM2-135M, AVX512-BF16 host:
  16 ms for 1 row, 23 for 12, against MKL's 56 and 85).
- otherwise oneDNN with packed weights, calls of 1-3 rows padded to 4 (oneDNN's own kernels for
  fewer rows are slower than its 4-row one, and the padding is what makes it row-independent):
  27-29 ms for 1-6 rows on a plain AVX-512 host. In bfloat16 the packing gives 23 vs 36 ms (1 row) and 26
  vs 45 ms (8 rows) on an AVX512-BF16 host. This is the kernel PyTorch's own compiler (Inductor)
  emits for CPU linears, reached through ``torch.ops.mkldnn``, checked once.

``python scripts/linear_kernels.py --threads N`` times all three for 1-16 rows.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from aurora_spec.models import row_kernel

PACK_BATCH_HINT = 16  # oneDNN chooses its blocking for this many rows; measured best for 1-16
MIN_ROWS = 4  # calls with fewer rows are padded to this many (see above)


def packed_kernels_available() -> bool:
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise")
            and hasattr(ops, "_reorder_linear_weight"))


@functools.cache
def packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs ``dtype`` weights on this CPU. float32 everywhere; bfloat16 needs
    AVX512-BW/VL/DQ or AVX-NE-CONVERT (an AVX2-only EPYC refuses it)."""
    if not packed_kernels_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=dtype), PACK_BATCH_HINT)
    except RuntimeError:
        return False
    return True


class CpuLinear:
    """One weight (and bias) packed for a row-independent kernel: the row kernel's blocks for
    float32 where it builds, oneDNN's otherwise (``kernel`` says which). A dtype oneDNN cannot
    pack here (bfloat16 without AVX-512) runs as an exact float32 copy through the float32
    kernels, inputs cast up and outputs back: row-independent still, at float32's memory. The
    packing is a copy: the source weight must not change afterwards (target weights are
    frozen). ``bf16_weights``: a float32 weight's row-kernel copy in bfloat16 (draft heads only,
    see RowLinear); ignored where the row kernel does not run it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 use_row_kernel: bool = True, bf16_weights: bool = False) -> None:
        self.dtype = weight.dtype
        self.upcast = weight.dtype != torch.float32 and not packs(weight.dtype)
        if self.upcast:
            weight = weight.float()
            bias = None if bias is None else bias.float()
        self.bias = bias
        # float32 goes through the row kernel where it builds (as fast as MKL for 1 row, and
        # row-independent: row_kernel.py); other dtypes and hosts keep oneDNN's packed blocks
        use_row = use_row_kernel and row_kernel.supports(weight)
        self.bf16_weights = bf16_weights  # as asked; ``kernel`` says whether it applies
        self.row = (row_kernel.RowLinear(weight, bias, bf16_weights=bf16_weights)
                    if use_row else None)
        self.packed = None if self.row else torch.ops.mkldnn._reorder_linear_weight(
            weight.detach(), PACK_BATCH_HINT)

    @property
    def kernel(self) -> str:
        name = "oneDNN" if not self.row else (
            "row kernel, bfloat16 weights" if self.row.bf16_weights else "row kernel")
        return f"{name} (float32 copy)" if self.upcast else name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.upcast:
            return self._call(x.float()).to(self.dtype)
        return self._call(x)

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        if self.row is not None:
            return self.row(x)
        k = x.shape[-1]
        rows = x.numel() // k
        if rows >= MIN_ROWS:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        padded = torch.cat((x.reshape(rows, k), x.new_zeros(MIN_ROWS - rows, k)))
        out = torch.ops.mkldnn._linear_pointwise(padded, self.packed, self.bias, "none", [], "")
        return out[:rows].reshape(*x.shape[:-1], out.shape[-1])


def linear(x: torch.Tensor, weight: torch.Tensor, fast: CpuLinear | None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through ``fast`` when the layer has CPU kernels."""
    return F.linear(x, weight, bias) if fast is None else fast(x)


@dataclass(frozen=True)
class KernelTiming:
    """Median ms of one pass over a set of weights, per kernel, summed over ``rows`` counts."""
    rows: tuple[int, ...]
    plain_ms: float
    packed_ms: float
    packed_bf16_ms: float | None = None  # the packed copies in bfloat16 (None: not timed)
    bf16_head_ms: float | None = None  # a bfloat16 copy of the weights, packed (None: not timed)

    @property
    def packed_wins(self) -> bool:
        return self.packed_ms < self.plain_ms

    @property
    def fastest(self) -> str:
        """``F.linear``, ``packed``, ``packed bf16`` or ``bf16 head``: the least time."""
        times = {"F.linear": self.plain_ms, "packed": self.packed_ms}
        if self.packed_bf16_ms is not None:
            times["packed bf16"] = self.packed_bf16_ms
        if self.bf16_head_ms is not None:
            times["bf16 head"] = self.bf16_head_ms
        return min(times, key=lambda name: times[name])


Kernel = Callable[[torch.Tensor], torch.Tensor]


def time_passes(weights: Sequence[torch.Tensor], kernels: Mapping[str, Sequence[Kernel]],
                rows: Sequence[int] = (1,), repeats: int = 15) -> dict[str, float]:
    """Median ms of one pass over ``weights`` (one call per weight, for each row count in
    ``rows``) per named kernel list, the kernels interleaved so a noisy moment hits all; the
    first round warms up and is not counted."""
    return _median_passes(weights, {name: (calls, rows) for name, calls in kernels.items()},
                          repeats)


def time_rows(weights: Sequence[torch.Tensor], kernels: Sequence[Kernel], rows: Sequence[int],
              repeats: int = 15) -> dict[int, float]:
    """Median ms of one pass over ``weights`` through ``kernels`` per row count in ``rows`` (how a
    verify's cost grows with its rows), the row counts interleaved as ``time_passes`` does."""
    return _median_passes(weights, {r: (kernels, (r,)) for r in rows}, repeats)


def _median_passes(weights: Sequence[torch.Tensor],
                   plans: Mapping[Any, tuple[Sequence[Kernel], Sequence[int]]],
                   repeats: int) -> dict[Any, float]:
    """Median ms per plan (a kernel list and the row counts it runs, one pass over ``weights``
    per row count), the plans interleaved round by round; round 0 warms up."""
    inputs = {(r, k): torch.randn(r, k, dtype=weights[0].dtype, device=weights[0].device)
              for _, rows in plans.values() for r in rows for k in {w.shape[1] for w in weights}}
    times: dict[Any, list[float]] = {key: [] for key in plans}
    with torch.inference_mode():
        for i in range(repeats + 1):
            for key, (calls, rows) in plans.items():
                start = time.perf_counter()
                for r in rows:
                    for w, call in zip(weights, calls, strict=True):
                        call(inputs[(r, w.shape[1])])
                if i:
                    times[key].append(time.perf_counter() - start)
    return {key: 1000 * statistics.median(t) for key, t in times.items()}


def plain_kernels(weights: Sequence[torch.Tensor]) -> list[Kernel]:
    """``F.linear`` on each weight, as a kernel list for ``time_passes``."""
    return [functools.partial(F.linear, weight=w) for w in weights]


def time_kernels(weights: Sequence[torch.Tensor], rows: Sequence[int] = (1,),
                 repeats: int = 15, bf16_weights: bool = False,
                 bf16_head: bool = False) -> KernelTiming:
    """Time one pass over ``weights`` through ``F.linear`` and through packed copies, for each row
    count in ``rows``, interleaved (so a noisy moment hits both). Which kernel wins depends on the
    CPU: packed won at every row count on an AVX512-BF16 host (table above), while on a plain
    AVX-512 host MKL won for 1-3 rows (``python scripts/linear_kernels.py``). Where a choice cannot
    change an output (draft heads), serving measures it at load. ``bf16_weights``: also time
    packed copies in bfloat16 (float32 weights on the row kernel only; draft heads only).
    ``bf16_head``: also time a bfloat16 copy of the weights, packed (``--draft-dtype auto``'s
    other choice where oneDNN multiplies bfloat16 natively); its calls take float32 rows and
    cast them, as a bfloat16 head's caller would."""
    kernels: dict[str, list[Kernel]] = {"plain": plain_kernels(weights),
                                        "packed": [CpuLinear(w) for w in weights]}
    if bf16_weights and all(row_kernel.supports(w) for w in weights):
        kernels["bf16"] = [CpuLinear(w, bf16_weights=True) for w in weights]
    if bf16_head and all(w.dtype == torch.float32 for w in weights):
        kernels["bf16 head"] = [_from_float32(CpuLinear(w.bfloat16())) for w in weights]
    t = time_passes(weights, kernels, rows, repeats)
    return KernelTiming(tuple(rows), t["plain"], t["packed"], t.get("bf16"), t.get("bf16 head"))


def _from_float32(kernel: Kernel) -> Kernel:
    return lambda x: kernel(x.to(torch.bfloat16))
