"""RMSNorm and the rotary embedding as single C calls for float32 CPU inference (``row_ops.c``).

Why: at batch 1 a decode step spends much of its time outside the linears, in per-operation
cost. ``torch.rms_norm`` on CPU is seven ATen operations (pow, mean, add, rsqrt, two muls and
conversions), 41 us for one 576-float row against 6 us for a single add (``python -m timeit``,
README "Kernels depend on the CPU"), and a SmolLM2-135M forward calls it 61 times; the rotary
embedding is five more operations per layer. Here each is one call of a few microseconds.

Where it applies: float32 tensors on CPU with autograd off (serving runs under inference_mode,
the trainer's judge under no_grad), when the C library builds. Training keeps the PyTorch
operations, whose gradients it needs; other dtypes and devices keep them too. Rows are computed
one by one in a fixed order, so a row's result does not depend on the rows beside it, which
lossless speculation needs (tests/unit/test_row_ops.py). The results match PyTorch's to float32
rounding, not bit for bit: every engine, target-only included, runs the same functions, so
speculative output still equals target-only output token for token.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from aurora_spec.models.row_kernel import compile_and_load

SOURCE = Path(__file__).with_name("row_ops.c")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled row_ops.c, or None (logged once) where it cannot be built or loaded."""
    lib = compile_and_load(SOURCE, "row ops", "RMSNorm and rotary embeddings use PyTorch")
    if lib is None:
        return None
    ptr, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.aurora_rms_norm.argtypes = [ptr, i64, i64, ptr, f32, f32, ptr, i32]
    lib.aurora_rms_norm.restype = None
    lib.aurora_rope.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, i32]
    lib.aurora_rope.restype = None
    lib.aurora_rope_at.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr]
    lib.aurora_rope_at.restype = None
    return lib


def applies(x: torch.Tensor) -> bool:
    """Whether ``x`` takes the C path: float32 on CPU, autograd off, library built."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled()
            and library() is not None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             offset: float = 0.0) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * (weight + offset)`` over the last dim (call where
    ``applies(x)``)."""
    lib = library()
    assert lib is not None
    dim = x.shape[-1]
    if weight.dtype != torch.float32 or weight.shape != (dim,):
        raise ValueError(f"rms_norm: weight must be float32 ({dim},), got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    x = x.contiguous()
    out = torch.empty_like(x)
    lib.aurora_rms_norm(x.data_ptr(), x.numel() // dim, dim, weight.data_ptr(), offset, eps,
                        out.data_ptr(), torch.get_num_threads())
    return out


def rope_(x: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor,
          sin_signed: torch.Tensor) -> None:
    """Rotate, in place, the first ``heads`` head vectors of every row of ``x``, a contiguous
    (..., W) tensor with W >= heads * head_dim (a fused q/k/v projection's output), by
    ``RopeTable`` rows: ``cos``, ``sin_signed`` hold one (head_dim,) row per row of ``x``."""
    lib = library()
    assert lib is not None
    rows, width = _rows(x, heads, head_dim)
    cos, sin_signed = cos.reshape(-1, head_dim).contiguous(), sin_signed.reshape(-1, head_dim)
    sin_signed = sin_signed.contiguous()
    if cos.shape[0] != rows or sin_signed.shape[0] != rows or cos.dtype != torch.float32 \
            or sin_signed.dtype != torch.float32:
        raise ValueError(f"rope_: cos {tuple(cos.shape)} {cos.dtype} does not fit x "
                         f"{tuple(x.shape)}")
    lib.aurora_rope(x.data_ptr(), rows, width, heads, head_dim, cos.data_ptr(),
                    sin_signed.data_ptr(), torch.get_num_threads())


def rope_at_(x: torch.Tensor, heads: int, head_dim: int, positions: torch.Tensor,
             inv_freq: torch.Tensor) -> None:
    """``rope_`` with the angles computed from integer ``positions`` (one per row of ``x``) and
    float32 ``inv_freq`` (head_dim / 2,), as ``layers.rope_cos_sin`` does: for the draft head,
    which keeps no table."""
    lib = library()
    assert lib is not None
    rows, width = _rows(x, heads, head_dim)
    pos = positions.reshape(-1).to(torch.int64).contiguous()
    freq = inv_freq.to(torch.float32).contiguous()
    if pos.shape[0] != rows or freq.shape != (head_dim // 2,):
        raise ValueError(f"rope_at_: {pos.shape[0]} positions and inv_freq "
                         f"{tuple(freq.shape)} do not fit x {tuple(x.shape)}")
    lib.aurora_rope_at(x.data_ptr(), rows, width, heads, head_dim, pos.data_ptr(),
                       freq.data_ptr())


def _rows(x: torch.Tensor, heads: int, head_dim: int) -> tuple[int, int]:
    """(rows, row width) of a contiguous (..., W) tensor with room for ``heads`` heads."""
    width = x.shape[-1]
    if not x.is_contiguous() or width < heads * head_dim or head_dim % 2:
        raise ValueError(f"x {tuple(x.shape)} (contiguous {x.is_contiguous()}) does not fit "
                         f"{heads} heads of {head_dim}")
    return x.numel() // max(width, 1), width
