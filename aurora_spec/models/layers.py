"""Building blocks shared by the target model and the draft head: norms, rotary embeddings,
attention over an explicit mask. Plain PyTorch, no framework magic, so the hot path stays short."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aurora_spec.models import row_ops


class RMSNorm(nn.Module):
    """RMSNorm; ``offset=1.0`` gives Gemma's (1 + weight) scaling."""

    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim) if offset == 0.0 else torch.zeros(dim))
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if row_ops.applies(x):  # inference in float32 on CPU: one C call (row_ops.py says why)
            return row_ops.rms_norm(x, self.weight, self.eps, self.offset)
        if x.dtype == torch.float32:
            w = self.weight + self.offset if self.offset else self.weight
            return F.rms_norm(x, (x.shape[-1],), w, self.eps)
        # Lower precision: normalise in float32 (as the reference implementations do).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (self.offset + self.weight.float())).to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies for rotary embeddings, with Llama-3 style scaling when configured."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling and scaling.get("rope_type") == "linear":
        inv = inv / float(scaling["factor"])
    elif scaling and scaling.get("rope_type") == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * torch.pi / inv
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_ctx / low, inv / factor, inv)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        inv = torch.where(is_mid, mid, scaled)
    return inv.float()


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for integer ``positions`` of shape (B, T) -> (B, 1, T, head_dim)."""
    freqs = positions.to(inv_freq.device, torch.float32)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, T, head_dim) by the half-split convention used by Llama and Gemma."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           scale: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention with grouped KV heads.

    q: (B, Hq, T, D); k, v: (B, Hkv, S, D); mask: bool (B, 1, T, S), True = may attend;
    None = every query sees every key.
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


class RopeTable:
    """cos / sign-folded sin for every position, built once: the hot path only indexes it.

    With ``sin_signed = [-sin_lo, sin_hi]``, rotating the half-split layout needs no negation:
    ``x * cos + swap_halves(x) * sin_signed`` equals ``apply_rope``.
    """

    def __init__(self, inv_freq: torch.Tensor, max_positions: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        pos = torch.arange(max_positions, dtype=torch.float32, device=device)
        freqs = pos[:, None] * inv_freq.to(device)[None]
        self.cos = torch.cat((freqs, freqs), -1).cos().to(dtype)
        self.sin = torch.cat((-freqs.sin(), freqs.sin()), -1).to(dtype)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) positions -> cos, sin of shape (B, 1, T, D)."""
        return self.cos[positions][:, None], self.sin[positions][:, None]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * sin_signed
