"""A decoder layer's row-wise work as single C calls for float32 CPU inference (``row_ops.c``):
RMSNorm (alone or after a residual add), the rotary embedding, a decode or verify step's
attention with its cache writes, and the gated MLP's ``silu(gate) * up``.

Why: at batch 1 a decode step spends much of its time outside the linears, in per-operation
cost. ``torch.rms_norm`` on CPU is seven ATen operations (pow, mean, add, rsqrt, two muls and
conversions), 41 us for one 576-float row against 6 us for a single add (``python -m timeit``,
docs/results/kernels.md "Kernels depend on the CPU"), and a SmolLM2-135M forward calls it 61 times;
the rotary embedding is five more operations per layer, and attention (two cache writes, slices,
sdpa and a transpose back) ~150 us per layer on the AVX2 host. Here each is one call.

Where it applies: float32 tensors on CPU with autograd off (serving runs under inference_mode,
the trainer's judge under no_grad), when the C library builds. Training keeps the PyTorch
operations, whose gradients it needs; other dtypes and devices keep them too, and so does a
prefill's attention (hundreds of queries, where sdpa's blocked kernel is faster;
``DecoderModel.forward(row_attention=False)``). Rows, and (token, head) pairs in attention, are
computed one by one in a fixed order, so a token's result does not depend on the tokens beside
it, on padding, or on threads, which lossless speculation needs (tests/unit/test_row_ops.py).
The results match PyTorch's to float32 rounding, not bit for bit: every engine, target-only
included, runs the same functions for the same kind of step, so speculative output still
equals target-only output token for token.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from aurora_spec.models.row_kernel import compile_and_load

SOURCE = Path(__file__).with_name("row_ops.c")


@functools.cache
def library(source: Path = SOURCE) -> ctypes.CDLL | None:
    """The compiled row_ops.c, or None (logged once) where it cannot be built or loaded.
    ``source``: another version of it, for before/after comparisons (scripts/verify_shapes.py
    ``--baseline-row-ops``); its results may differ in the last bits."""
    lib = compile_and_load(source, "row ops",
                           "RMSNorm, rotary embeddings, attention and the MLP's activation use "
                           "PyTorch's operations")
    if lib is None:
        return None
    ptr, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.aurora_rms_norm.argtypes = [ptr, i64, i64, ptr, f32, f32, ptr, i32]
    lib.aurora_rms_norm.restype = None
    lib.aurora_rope.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, i32]
    lib.aurora_rope.restype = None
    lib.aurora_rope_at.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr]
    lib.aurora_rope_at.restype = None
    lib.aurora_attend.argtypes = [ptr, i64, i64, i64, i64, i64, ptr, ptr, i64, i64, ptr, ptr, ptr,
                                  i64, i64, ptr, f32, ptr, i32]
    lib.aurora_attend.restype = None
    lib.aurora_silu_mul.argtypes = [ptr, i64, i64, ptr, i32]
    lib.aurora_silu_mul.restype = None
    lib.aurora_add_rms_norm.argtypes = [ptr, ptr, i64, i64, ptr, f32, f32, ptr, ptr, i32]
    lib.aurora_add_rms_norm.restype = None
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


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float,
                 offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + y, rms_norm(x + y))`` in one call (a residual add and the norm after it); the sum
    has the bits of ``x + y`` (call where ``applies(x)``)."""
    lib = library()
    assert lib is not None
    dim = x.shape[-1]
    if y.shape != x.shape or y.dtype != x.dtype or weight.dtype != torch.float32 \
            or weight.shape != (dim,):
        raise ValueError(f"add_rms_norm: y {y.dtype} {tuple(y.shape)} and weight "
                         f"{weight.dtype} {tuple(weight.shape)} do not fit x {tuple(x.shape)}")
    x, y = x.contiguous(), y.contiguous()
    total, out = torch.empty_like(x), torch.empty_like(x)
    lib.aurora_add_rms_norm(x.data_ptr(), y.data_ptr(), x.numel() // dim, dim, weight.data_ptr(),
                            offset, eps, total.data_ptr(), out.data_ptr(), torch.get_num_threads())
    return total, out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for the fused gate/up projection's output (..., 2 * I), gate first:
    (..., I). Its exp is a polynomial within a few ulp of expf, not PyTorch's (call where
    ``applies(gate_up)``; every engine's decode and verify steps do, so outputs still match)."""
    lib = library()
    assert lib is not None
    width = gate_up.shape[-1]
    if width % 2:
        raise ValueError(f"silu_mul: the last dim must be gate and up, got {width}")
    gate_up = gate_up.contiguous()
    out = gate_up.new_empty(*gate_up.shape[:-1], width // 2)
    lib.aurora_silu_mul(gate_up.data_ptr(), gate_up.numel() // max(width, 1), width // 2,
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


def attend(qkv: torch.Tensor, heads: tuple[int, int, int], cos: torch.Tensor,
           sin_signed: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_len: int,
           mask: torch.Tensor, scale: float, start: int = 0,
           tokens: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
           ) -> torch.Tensor | None:
    """One layer's attention from the fused q/k/v projection ``qkv`` (B, T, W) with ``heads`` =
    (query heads, key/value heads, head_dim): rotates q and k in place (``rope_``), writes each
    token's key and value into ``k_cache`` / ``v_cache`` (B, n_kv, capacity, D), then attends
    over the first ``kv_len`` positions of its batch row under the additive ``mask``
    (B, 1, T, kv_len). Returns (B, T, n_q * D), or None, touching nothing, where the layout does
    not fit (the caller keeps PyTorch's operations). The tokens are written at ``start`` ..
    ``start + T - 1``, or, with ``tokens`` = (batch rows, positions, mask rows) of a packed
    ragged batch (transformer's PackedRows: ``qkv`` is then (1, N, W)), each where those say."""
    lib = library()
    assert lib is not None
    nq, nkv, d = heads
    b, t, width = qkv.shape
    grid_rows = mask.shape[0] * mask.shape[2]
    fits = (qkv.is_contiguous() and width >= (nq + 2 * nkv) * d
            and k_cache.dtype == torch.float32 and k_cache.is_contiguous()
            and v_cache.is_contiguous() and v_cache.shape == k_cache.shape
            and k_cache.dim() == 4 and k_cache.shape[1] == nkv and k_cache.shape[3] == d
            and mask.dtype == torch.float32 and mask.is_contiguous()
            and mask.shape[-1] == kv_len <= k_cache.shape[2])
    if tokens is None:
        fits = fits and grid_rows == b * t and b <= k_cache.shape[0] and start + t <= kv_len
    else:
        fits = fits and all(x.dtype == torch.int64 and x.is_contiguous() and x.numel() == t
                            for x in tokens)
    if not fits:
        return None
    rope_(qkv, nq + nkv, d, cos, sin_signed)
    return attend_rotated(lib, qkv, heads, k_cache, v_cache, kv_len, mask, scale, start, tokens)


def attend_rotated(lib: ctypes.CDLL, qkv: torch.Tensor, heads: tuple[int, int, int],
                   k_cache: torch.Tensor, v_cache: torch.Tensor, kv_len: int, mask: torch.Tensor,
                   scale: float, start: int = 0,
                   tokens: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                   ) -> torch.Tensor:
    """``attend``'s C call alone, on layouts it checked and q/k already rotated; ``lib`` is a
    build of row_ops.c (scripts/attention_kernel.py passes two, to compare them)."""
    nq, nkv, d = heads
    b, t, width = qkv.shape
    out = qkv.new_empty(b, t, nq * d)
    ptrs = (None, None, None) if tokens is None else tuple(x.data_ptr() for x in tokens)
    lib.aurora_attend(qkv.data_ptr(), b * t, width, nq, nkv, d, k_cache.data_ptr(),
                      v_cache.data_ptr(), k_cache.shape[2], kv_len, *ptrs, t, start,
                      mask.data_ptr(), scale, out.data_ptr(), torch.get_num_threads())
    return out
