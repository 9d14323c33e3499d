"""Linear layers in the weight layout that CPU kernels read fastest.

Why: a decode or verify step on CPU is one pass over all weights, and ``F.linear`` (MKL) reads
the (out, in) layout slowly for a few rows. Measured on the 2-core development machine for all
linears of one SmolLM2-135M forward, float32, 1 thread (``python scripts/linear_kernels.py``):

    rows                        1      2      3      4      8     16
    F.linear (MKL)             51     90    113     71     83    106  ms
    oneDNN, packed weights     36     36     35     34     43     59  ms

oneDNN's own kernels for fewer than 4 rows are slower than its 4-row kernel, so calls with 1-3
rows are padded to 4 (the table includes that): a verify of up to 8 tokens then costs little more
than a one-token step. With the padding the result of a row does not depend on how many rows
share the call (tests/unit/test_cpu_linear.py), so verify logits equal one-token decode logits as
far as the linears go. In bfloat16 the same packing gives 23 vs 36 ms (1 row) and 26 vs 45 ms
(8 rows). The packed linear is the kernel PyTorch's own compiler (Inductor) emits for CPU
linears; it is reached through ``torch.ops.mkldnn``, checked once, with ``F.linear`` as the
fallback.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PACK_BATCH_HINT = 16  # oneDNN chooses its blocking for this many rows; measured best for 1-16
MIN_ROWS = 4  # calls with fewer rows are padded to this many (see above)


def packed_kernels_available() -> bool:
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise")
            and hasattr(ops, "_reorder_linear_weight"))


class CpuLinear:
    """One weight (and bias) held as oneDNN-packed blocks. The packing is a copy: the source
    weight must not change afterwards (target weights are frozen)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.bias = bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH_HINT)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
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

    @property
    def packed_wins(self) -> bool:
        return self.packed_ms < self.plain_ms


def time_kernels(weights: Sequence[torch.Tensor], rows: Sequence[int] = (1,),
                 repeats: int = 15) -> KernelTiming:
    """Time one pass over ``weights`` through ``F.linear`` and through packed copies, for each row
    count in ``rows``, interleaved (so a noisy moment hits both). Which kernel wins depends on the
    CPU: packed won at every row count on an AVX512-BF16 host (table above), while on a plain
    AVX-512 host MKL won for 1-3 rows (``python scripts/linear_kernels.py``). Where a choice cannot
    change an output (draft heads), serving measures it at load."""
    packed = [CpuLinear(w) for w in weights]
    inputs = {(r, k): torch.randn(r, k, dtype=weights[0].dtype, device=weights[0].device)
              for r in rows for k in {w.shape[1] for w in weights}}
    times: dict[bool, list[float]] = {False: [], True: []}
    with torch.inference_mode():
        for i in range(repeats + 1):  # the first round warms both up and is not counted
            for use_packed in (False, True):
                start = time.perf_counter()
                for r in rows:
                    for w, p in zip(weights, packed, strict=True):
                        x = inputs[(r, w.shape[1])]
                        p(x) if use_packed else F.linear(x, w)
                if i:
                    times[use_packed].append(time.perf_counter() - start)
    return KernelTiming(tuple(rows), 1000 * statistics.median(times[False]),
                        1000 * statistics.median(times[True]))
