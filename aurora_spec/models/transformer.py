"""Our own decoder forward for Llama-family and Gemma 3 text models.

Why not call the transformers model? Speculative decoding needs three things its generic forward
makes expensive: writing new keys/values into a preallocated cache at chosen slots (transformers
concatenates), tree attention masks with per-token positions, and the hidden states of three chosen
layers. This module is short, loads the same safetensors weights, and is tested against
transformers' logits (tests/unit/test_transformer.py): the fast path against the slow reference.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from aurora_spec.models import row_ops
from aurora_spec.models.cpu_linear import CpuLinear, linear, packed_kernels_available
from aurora_spec.models.layers import RMSNorm, RopeTable, rope_inv_freq, rotate

LLAMA_LIKE = {"llama", "mistral", "qwen2"}
GEMMA = {"gemma3_text", "gemma3"}


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class ModelSpec:
    """Everything the forward needs to know about an architecture, read from config.json."""

    arch: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    local_rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_embeddings: bool
    attn_bias: bool = False
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()
    final_logit_softcap: float | None = None
    query_pre_attn_scalar: float | None = None

    @property
    def is_gemma(self) -> bool:
        return self.arch in GEMMA

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size) if self.is_gemma else 1.0

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def hidden_layers(self) -> tuple[int, int, int]:
        """Target layers fused by the EAGLE-3 head: low, middle, high (as in EAGLE-3)."""
        n = self.num_layers
        return (min(2, n - 1), n // 2, max(n - 3, 0))

    @staticmethod
    def from_config(cfg: dict) -> ModelSpec:
        cfg = cfg.get("text_config", cfg) if cfg.get("model_type") == "gemma3" else cfg
        arch = cfg.get("model_type", "")
        if arch not in LLAMA_LIKE | GEMMA:
            raise UnsupportedModelError(
                f"model type {arch!r} is not supported (supported: "
                f"{', '.join(sorted(LLAMA_LIKE | GEMMA))})")
        heads = cfg["num_attention_heads"]
        rope = cfg.get("rope_parameters") or {}
        full_rope = rope.get("full_attention", rope)
        local_rope = rope.get("sliding_attention", {})
        theta = full_rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = full_rope if full_rope.get("rope_type") not in (None, "default") else None
        scaling = scaling or cfg.get("rope_scaling")
        layer_types = cfg.get("layer_types") or []
        if arch in GEMMA and not layer_types:
            layer_types = ["sliding_attention" if (i + 1) % 6 else "full_attention"
                           for i in range(cfg["num_hidden_layers"])]
        return ModelSpec(
            arch=arch, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"], num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            intermediate_size=cfg["intermediate_size"], rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            local_rope_theta=float(local_rope.get("rope_theta", cfg.get("rope_local_base_freq",
                                                                        theta))),
            rope_scaling=scaling, max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_embeddings=cfg.get("tie_word_embeddings", arch in GEMMA),
            attn_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
            sliding_window=cfg.get("sliding_window") if arch in GEMMA else None,
            sliding_layers=tuple(t == "sliding_attention" for t in layer_types),
            final_logit_softcap=cfg.get("final_logit_softcapping"),
            query_pre_attn_scalar=cfg.get("query_pre_attn_scalar") if arch in GEMMA else None,
        )


class Block(nn.Module):
    """One decoder layer. q/k/v and gate/up are fused into single matmuls (fewer kernel calls)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        h, d = spec.hidden_size, spec.head_dim
        self.n_q, self.n_kv, self.head_dim = spec.num_heads, spec.num_kv_heads, d
        self.qkv = nn.Linear(h, (self.n_q + 2 * self.n_kv) * d, bias=spec.attn_bias)
        self.o = nn.Linear(self.n_q * d, h, bias=False)
        self.gate_up = nn.Linear(h, 2 * spec.intermediate_size, bias=False)
        self.down = nn.Linear(spec.intermediate_size, h, bias=False)
        offset = 1.0 if spec.is_gemma else 0.0
        self.input_norm = RMSNorm(h, spec.rms_norm_eps, offset)
        self.post_attn_norm = RMSNorm(h, spec.rms_norm_eps, offset)
        self.gemma = spec.is_gemma
        if self.gemma:  # Gemma 3 "sandwich" norms and q/k norms
            self.pre_ffn_norm = RMSNorm(h, spec.rms_norm_eps, offset)
            self.post_ffn_norm = RMSNorm(h, spec.rms_norm_eps, offset)
            self.q_norm = RMSNorm(d, spec.rms_norm_eps, offset)
            self.k_norm = RMSNorm(d, spec.rms_norm_eps, offset)
        self.scale = spec.attn_scale
        self.kernels: tuple[CpuLinear, ...] | None = None  # qkv, o, gate_up, down

    def use_cpu_kernels(self) -> None:
        self.kernels = (CpuLinear(self.qkv.weight, self.qkv.bias), CpuLinear(self.o.weight),
                    CpuLinear(self.gate_up.weight), CpuLinear(self.down.weight))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, write: slice | PackedRows,
                kv_len: int, packed: bool = True, row_attention: bool = True) -> torch.Tensor:
        """``mask`` is additive (0 / -inf), (B, 1, T, kv_len). Written with functional calls and
        q and k rotated together: at batch 1 the decode step is bound by per-op overhead.
        With ``write`` a PackedRows, ``x`` holds only the batch's real tokens, (1, N, H).
        ``packed=False``: F.linear even where packed copies exist (DecoderModel.forward).
        ``row_attention=False``: PyTorch's attention even where row_ops applies (prefill)."""
        cpu = (self.kernels if packed else None) or _NO_KERNELS
        qkv = linear(self.input_norm(x), self.qkv.weight, cpu[0], self.qkv.bias)
        # A decode or verify step's row-wise work as C calls (row_ops.py): every engine takes
        # the same path for the same kind of step, so their outputs still match
        in_c = row_attention and not self.gemma and row_ops.applies(qkv)
        attn = None
        if in_c:  # rotation, cache writes, attention
            attn = row_ops.attend(qkv, (self.n_q, self.n_kv, self.head_dim), cos, sin, k_cache,
                                  v_cache, kv_len, mask, self.scale, **_tokens(write))
        if attn is None:
            attn = self._attend(qkv, cos, sin, mask, k_cache, v_cache, write, kv_len)
        attn_out = linear(attn, self.o.weight, cpu[1])
        norm = self.post_attn_norm
        if self.gemma:
            x = x + norm(attn_out)
            mlp_in = self.pre_ffn_norm(x)
        elif in_c:
            x, mlp_in = row_ops.add_rms_norm(x, attn_out, norm.weight, norm.eps, norm.offset)
        else:
            x = x + attn_out
            mlp_in = norm(x)
        gate_up = linear(mlp_in, self.gate_up.weight, cpu[2])
        if in_c:
            act = row_ops.silu_mul(gate_up)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            act = (F.gelu(gate, approximate="tanh") if self.gemma else F.silu(gate)) * up
        mlp_out = linear(act, self.down.weight, cpu[3])
        return x + (self.post_ffn_norm(mlp_out) if self.gemma else mlp_out)

    def _attend(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, write: slice | PackedRows,
                kv_len: int) -> torch.Tensor:
        """row_ops.attend in PyTorch operations (prefill, Gemma, other dtypes and devices,
        autograd): (B, T, W) fused projection -> (B, T, n_q * D), keys and values written to the
        cache."""
        b, t, _ = qkv.shape
        nq, nkv, d = self.n_q, self.n_kv, self.head_dim
        qkv = qkv.view(b, t, -1, d).transpose(1, 2)  # (B, heads, T, D)
        if self.gemma:
            qk = torch.cat((self.q_norm(qkv[:, :nq]), self.k_norm(qkv[:, nq:nq + nkv])), dim=1)
        else:
            qk = qkv[:, :nq + nkv]
        qk = rotate(qk, cos, sin)
        q, k, v = qk[:, :nq], qk[:, nq:], qkv[:, nq + nkv:]
        if isinstance(write, PackedRows):
            write.store(k_cache, v_cache, k, v)
            q = write.to_grid(q)
        else:
            k_cache[:, :, write] = k
            v_cache[:, :, write] = v
        attn = F.scaled_dot_product_attention(
            q, k_cache[:, :, :kv_len], v_cache[:, :, :kv_len], attn_mask=mask, scale=self.scale,
            enable_gqa=nq != nkv)
        if isinstance(write, PackedRows):
            attn = write.from_grid(attn)
        return attn.transpose(1, 2).reshape(b, t, nq * d)


def _tokens(write: slice | PackedRows) -> dict[str, Any]:
    """Where row_ops.attend writes keys and values: a start position, or a packed batch's rows."""
    if isinstance(write, PackedRows):
        return {"tokens": (write.batch, write.pos, write.rows)}
    return {"start": write.start or 0}


_NO_KERNELS = (None, None, None, None)


@dataclass(frozen=True)
class PackedRows:
    """A ragged batch with its padding removed: B requests of up to T tokens each, of which only
    the N real tokens flow through the linears (the bulk of a forward). Attention alone needs the
    (B, T) layout: queries are scattered into it (``to_grid``) and the result gathered back
    (``from_grid``); keys and values go straight to their cache slots (``store``).

    ``rows``: (N,) flat indices of the real tokens in the B x T grid, request-major;
    ``batch``, ``pos``: (N,) cache row and cache position each real token writes its key to."""

    b: int
    t: int
    rows: torch.Tensor
    batch: torch.Tensor
    pos: torch.Tensor

    def store(self, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """k/v: (1, Hkv, N, D) -> each token's cache row and position."""
        k_cache[self.batch, :, self.pos] = k[0].transpose(0, 1)
        v_cache[self.batch, :, self.pos] = v[0].transpose(0, 1)

    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """(1, H, N, D) packed -> (B, H, T, D), zeros at padded positions."""
        h, d = x.shape[1], x.shape[3]
        grid = x.new_zeros(self.b * self.t, h, d)
        grid[self.rows] = x[0].transpose(0, 1)
        return grid.view(self.b, self.t, h, d).transpose(1, 2)

    def from_grid(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) -> (1, H, N, D), the real positions only."""
        h, d = x.shape[1], x.shape[3]
        return x.transpose(1, 2).reshape(self.b * self.t, h, d)[self.rows].transpose(0, 1)[None]


@dataclass(frozen=True)
class ForwardOutput:
    logits: torch.Tensor  # (B, T, V) float32 (only rows asked for when logits_rows is given)
    fused_hidden: torch.Tensor  # (B, T, 3H): outputs of the low / middle / high layers
    final_hidden: torch.Tensor  # (B, T, H): final-norm output (the lm_head input)


class DecoderModel(nn.Module):
    """Token ids in, logits + chosen hidden states out, keys/values written into given caches."""

    inv_freq: torch.Tensor  # buffers, registered in __init__
    local_inv_freq: torch.Tensor

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.blocks = nn.ModuleList(Block(spec) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, 1.0 if spec.is_gemma else 0.0)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("inv_freq", rope_inv_freq(spec.head_dim, spec.rope_theta,
                                                       spec.rope_scaling), persistent=False)
        self.register_buffer("local_inv_freq", rope_inv_freq(spec.head_dim, spec.local_rope_theta),
                             persistent=False)
        self.hidden_layers = spec.hidden_layers()
        self._rope_tables: dict[str, RopeTable] = {}
        self.cpu_lm_head: CpuLinear | None = None

    def use_cpu_kernels(self) -> None:
        """Run every linear through CPU-friendly weight layouts (cpu_linear.py says why and what
        it measured). Costs one extra copy of the weights; they must not change afterwards."""
        for block in self.blocks:
            cast(Block, block).use_cpu_kernels()
        self.cpu_lm_head = CpuLinear(self.lm_head.weight)

    def _rope(self, kind: str) -> RopeTable:
        """Rotary tables, built on first use in the model's dtype and device."""
        table = self._rope_tables.get(kind)
        weight = self.embed.weight
        if table is None or table.cos.dtype != weight.dtype or table.cos.device != weight.device:
            inv = self.inv_freq if kind == "global" else self.local_inv_freq
            table = RopeTable(inv, self.spec.max_position_embeddings, weight.dtype, weight.device)
            self._rope_tables[kind] = table
        return table

    @staticmethod
    def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Bool mask -> additive float mask, once per forward rather than once per layer."""
        if mask.dtype != torch.bool:
            return mask
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            ~mask, float("-inf"))

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        return x * torch.tensor(self.spec.embed_scale, dtype=x.dtype) if self.spec.is_gemma else x

    def linear_weights(self) -> list[torch.Tensor]:
        """The weights of every linear of a forward, lm_head included (what kernels are timed on)."""
        return [p for n, p in self.named_parameters()
                if p.dim() == 2 and n not in ("embed.weight", "lm_head.weight")] + [self.lm_head.weight]

    def linear_kernels(self) -> list[CpuLinear] | None:
        """The packed copies a forward's linears run through, in ``linear_weights()``'s order;
        None before use_cpu_kernels (or where there are none)."""
        if self.cpu_lm_head is None:
            return None
        return [k for b in self.blocks for k in cast(Block, b).kernels or ()] + [self.cpu_lm_head]

    def logits(self, final_hidden: torch.Tensor, packed: bool = True) -> torch.Tensor:
        out = linear(final_hidden, self.lm_head.weight,
                     self.cpu_lm_head if packed else None).float()
        cap = self.spec.final_logit_softcap
        return torch.tanh(out / cap) * cap if cap else out

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor,
                caches: list[tuple[torch.Tensor, torch.Tensor]], write: slice | PackedRows,
                kv_len: int, mask: torch.Tensor, sliding_mask: torch.Tensor | None = None,
                logits_rows: slice | None = None, packed: bool = True,
                row_attention: bool = True) -> ForwardOutput:
        """tokens/positions: (B, T), or (1, N) with ``write`` a PackedRows (a ragged batch's real
        tokens); caches: per layer (k, v) of shape (B, n_kv, capacity, D); mask/sliding_mask:
        bool (B, 1, T, kv_len). ``logits_rows`` limits the lm_head to some rows
        (prefill needs only the last one). ``packed``: the linears read the packed copies
        (use_cpu_kernels), if any; False: F.linear, whose result for a row depends on how many
        rows share the call (runtime.target_kernels says when an engine may use it).
        ``row_attention``: attention through row_ops.attend where it applies (decode and verify
        steps: one call per layer, a token's result independent of the tokens beside it); False:
        PyTorch's (prefill: hundreds of queries, where its blocked kernel is faster). Every
        engine prefills and steps alike, so target-only and speculative outputs still match."""
        x = self.embed_tokens(tokens)
        cos, sin = self._rope("global").lookup(positions)
        if self.spec.is_gemma:
            lcos, lsin = self._rope("local").lookup(positions)
        mask = self._additive(mask, x.dtype)
        if sliding_mask is not None:
            sliding_mask = self._additive(sliding_mask, x.dtype)
        saved: dict[int, torch.Tensor] = {}
        for i, (block, (kc, vc)) in enumerate(zip(self.blocks, caches, strict=True)):
            sliding = self.spec.is_gemma and self.spec.sliding_layers[i]
            if sliding:
                x = block(x, lcos, lsin, sliding_mask, kc, vc, write, kv_len, packed)
            else:
                x = block(x, cos, sin, mask, kc, vc, write, kv_len, packed, row_attention)
            if i in self.hidden_layers:
                saved[i] = x
        final = self.norm(x)
        rows = final if logits_rows is None else final[:, logits_rows]
        fused = torch.cat([saved[i] for i in self.hidden_layers], dim=-1)
        return ForwardOutput(self.logits(rows, packed), fused, final)


def _hf_to_ours(spec: ModelSpec, read) -> dict[str, torch.Tensor]:
    """Map Hugging Face parameter names to ours, fusing q/k/v and gate/up."""
    out = {"embed.weight": read("model.embed_tokens.weight"), "norm.weight": read("model.norm.weight")}
    if not spec.tie_embeddings:
        out["lm_head.weight"] = read("lm_head.weight")
    for i in range(spec.num_layers):
        p, o = f"model.layers.{i}.", f"blocks.{i}."
        out[o + "qkv.weight"] = torch.cat([read(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
        if spec.attn_bias:
            out[o + "qkv.bias"] = torch.cat([read(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
        out[o + "o.weight"] = read(p + "self_attn.o_proj.weight")
        out[o + "gate_up.weight"] = torch.cat([read(p + "mlp.gate_proj.weight"),
                                               read(p + "mlp.up_proj.weight")])
        out[o + "down.weight"] = read(p + "mlp.down_proj.weight")
        out[o + "input_norm.weight"] = read(p + "input_layernorm.weight")
        out[o + "post_attn_norm.weight"] = read(p + "post_attention_layernorm.weight")
        if spec.is_gemma:
            out[o + "pre_ffn_norm.weight"] = read(p + "pre_feedforward_layernorm.weight")
            out[o + "post_ffn_norm.weight"] = read(p + "post_feedforward_layernorm.weight")
            out[o + "q_norm.weight"] = read(p + "self_attn.q_norm.weight")
            out[o + "k_norm.weight"] = read(p + "self_attn.k_norm.weight")
    return out


def _load_checked(model: DecoderModel, state: dict[str, torch.Tensor], assign: bool = False) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False, assign=assign)
    # lm_head is legitimately absent when tied to the embedding.
    missing = [m for m in missing if not (m == "lm_head.weight" and model.spec.tie_embeddings)]
    if missing or unexpected:
        raise UnsupportedModelError(f"weights do not match the architecture: missing {missing[:3]}, "
                                    f"unexpected {unexpected[:3]}")


def load_decoder(model_dir: Path, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", cpu_kernels: bool | None = None
                 ) -> DecoderModel:
    """Build a DecoderModel from a Hugging Face directory (config.json + *.safetensors).
    ``cpu_kernels`` (default: on when the device is a CPU and oneDNN is available) trades an extra
    copy of the weights for ~1.3-2x faster forwards (cpu_linear.py)."""
    spec = ModelSpec.from_config(json.loads((Path(model_dir) / "config.json").read_text()))
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise UnsupportedModelError(f"no .safetensors weights in {model_dir}")
    handles = [safe_open(str(f), framework="pt") for f in files]
    index = {k: h for h in handles for k in h.keys()}

    def read(name: str) -> torch.Tensor:
        for key in (name, name.replace("model.", "model.language_model.", 1)):
            if key in index:
                return index[key].get_tensor(key)
        raise UnsupportedModelError(f"weight {name} missing from {model_dir}")

    with torch.device("meta"):
        model = DecoderModel(spec)
    state = {k: v.to(dtype) for k, v in _hf_to_ours(spec, read).items()}
    _load_checked(model, state, assign=True)
    if spec.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    model.inv_freq = rope_inv_freq(spec.head_dim, spec.rope_theta, spec.rope_scaling)
    model.local_inv_freq = rope_inv_freq(spec.head_dim, spec.local_rope_theta)
    model = model.to(device).eval().requires_grad_(False)
    if cpu_kernels is None:
        cpu_kernels = torch.device(device).type == "cpu" and packed_kernels_available()
    if cpu_kernels:
        model.use_cpu_kernels()
    return model


def from_hf_model(hf_model: nn.Module, dtype: torch.dtype = torch.float32) -> DecoderModel:
    """Build a DecoderModel sharing nothing with an in-memory transformers model (tests)."""
    spec = ModelSpec.from_config(cast(Any, hf_model).config.to_dict())
    sd = hf_model.state_dict()

    def read(name: str) -> torch.Tensor:
        return sd[name].detach().clone()

    model = DecoderModel(spec)
    _load_checked(model, {k: v.to(dtype) for k, v in _hf_to_ours(spec, read).items()})
    if spec.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.to(dtype).eval().requires_grad_(False)
