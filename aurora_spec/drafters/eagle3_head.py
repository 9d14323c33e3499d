"""The EAGLE-3 style draft head: one module shared by serving (Eagle3Drafter) and the online
trainer (DESIGN.md section 3).

Input at draft position j is the pair (h_j, x_{j+1}): h_j is either the fused target hidden
state (``fuse`` of the low/mid/high layer outputs, 3H -> H) or, when drafting on its own
outputs, the head's previous pre-norm output; x_{j+1} is embedded with the target's frozen
embedding. One decoder layer whose attention reads [embed_norm(emb), hidden_norm(h)] (2H), then
``norm`` and ``lm_head`` over a pruned draft vocabulary; ``d2t`` maps draft ids to target ids.

Parameter layout (for EAGLE-3 export): ``qkv`` is q_proj, k_proj, v_proj stacked on the output
dim; ``gate_up`` is gate_proj, up_proj stacked; ``embed_norm`` is EAGLE-3's input_layernorm.
``d2t`` holds absolute target ids (EAGLE-3 files store offsets d2t[i] - i).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from aurora_spec.models import row_ops
from aurora_spec.models.blocks import WindowBlocks
from aurora_spec.models.cpu_linear import CpuLinear, packed_kernels_available
from aurora_spec.models.layers import (
    RMSNorm,
    apply_rope,
    attend,
    rope_cos_sin,
    rope_inv_freq,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Eagle3Config:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    draft_vocab_size: int
    target_vocab_size: int
    target_layers: tuple[int, int, int]

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if not 0 < self.draft_vocab_size <= self.target_vocab_size:
            raise ValueError("draft_vocab_size must be in [1, target_vocab_size]")
        object.__setattr__(self, "target_layers", tuple(int(i) for i in self.target_layers))

    @staticmethod
    def from_spec(spec: Any, draft_vocab_size: int) -> Eagle3Config:
        """Head shaped like one layer of a loaded target (its ``DecoderModel.spec``), fusing the
        same three layers the target runner reports."""
        return Eagle3Config(
            hidden_size=spec.hidden_size, num_heads=spec.num_heads,
            num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
            intermediate_size=spec.intermediate_size, rms_norm_eps=spec.rms_norm_eps,
            rope_theta=spec.rope_theta, draft_vocab_size=min(draft_vocab_size, spec.vocab_size),
            target_vocab_size=spec.vocab_size, target_layers=spec.hidden_layers())

    @staticmethod
    def from_target(hf_config: Any, draft_vocab_size: int = 32768) -> Eagle3Config:
        """Head shaped like one target decoder layer. Accepts a transformers config (llama-like or
        gemma3, multimodal configs via get_text_config()) or the equivalent config.json dict."""
        cfg = hf_config
        if hasattr(cfg, "get_text_config"):
            cfg = cfg.get_text_config()
        if hasattr(cfg, "to_dict"):
            cfg = cfg.to_dict()
        cfg = cfg.get("text_config") or cfg  # raw gemma3 config.json
        heads = cfg["num_attention_heads"]
        rope = cfg.get("rope_parameters") or {}
        rope = rope.get("full_attention", rope)  # gemma3: per-layer-type parameters
        theta = rope.get("rope_theta") or cfg.get("rope_theta") or 10000.0
        layers, vocab = cfg["num_hidden_layers"], cfg["vocab_size"]
        return Eagle3Config(
            hidden_size=cfg["hidden_size"], num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            intermediate_size=cfg["intermediate_size"],
            rms_norm_eps=float(cfg.get("rms_norm_eps") or 1e-6), rope_theta=float(theta),
            draft_vocab_size=min(draft_vocab_size, vocab), target_vocab_size=vocab,
            # Same choice as the target runner: EAGLE-3's (2, L//2, L-3), clamped for tiny models.
            target_layers=(min(2, layers - 1), layers // 2, max(layers - 3, 0)))


def default_draft_vocab(cfg: Eagle3Config) -> torch.Tensor:
    """Day-0 draft vocabulary: the first draft_vocab_size target ids (BPE vocabularies are roughly
    ordered by merge frequency). The trainer rebuilds it from traffic frequencies."""
    return torch.arange(cfg.draft_vocab_size, dtype=torch.long)


class DraftCache:
    """Keys/values of one head for a batch of sequences, preallocated and grown in chunks so the
    per-step append is an in-place copy, not a reallocation of the whole cache.

    ``length`` is the number of valid entries; setting it back drops entries (speculative ones)
    without freeing memory. When the new keys require grad (training), appends concatenate
    instead, because autograd forbids overwriting tensors saved for backward.
    """

    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, device: torch.device | str,
                 dtype: torch.dtype, chunk: int = 256) -> None:
        self.chunk = chunk
        self.k = torch.empty(batch, num_kv_heads, 0, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def reserve(self, n: int) -> None:
        """Make room for n entries in total (amortised: grows at least by half or one chunk)."""
        if n <= self.capacity:
            return
        cap = max(n, self.capacity + max(self.chunk, self.capacity // 2))
        cap = -(-cap // self.chunk) * self.chunk
        shape = (*self.k.shape[:2], cap, self.k.shape[3])
        k = self.k.new_empty(shape)
        v = self.v.new_empty(shape)
        k[:, :, :self.length] = self.k[:, :, :self.length]
        v[:, :, :self.length] = self.v[:, :, :self.length]
        self.k, self.v = k, v

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add (B, Hkv, T, D) entries; return views of all valid keys and values."""
        start, end = self.length, self.length + k.shape[2]
        if k.requires_grad or v.requires_grad:
            self.k = torch.cat((self.k[:, :, :start], k), dim=2)
            self.v = torch.cat((self.v[:, :, :start], v), dim=2)
        else:
            self.reserve(end)
            self.k[:, :, start:end] = k
            self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


def causal_mask(start: int, t: int, device: torch.device) -> torch.Tensor:
    """(1, 1, t, start + t) bool: query i (at cache index start + i) sees keys 0..start + i."""
    keys = torch.arange(start + t, device=device)
    queries = torch.arange(start, start + t, device=device)
    return (keys[None, :] <= queries[:, None])[None, None]



def carry_rows(old: torch.Tensor, old_rows: torch.Tensor,
               fill: torch.Tensor | None = None) -> torch.Tensor:
    """Per-draft-row tensor after a vocabulary rebuild: row i is ``old[old_rows[i]]``; rows of
    tokens new to the vocabulary (``old_rows`` -1) come from ``fill`` (same shape as the result),
    or are zero. Used for the lm_head, its optimizer moments and their moving average."""
    out = (torch.zeros((len(old_rows), *old.shape[1:]), device=old.device, dtype=old.dtype)
           if fill is None else fill.detach().clone())
    keep = (old_rows >= 0).to(old.device)
    out[keep] = old[old_rows.to(old.device)[keep]]
    return out

class Eagle3Head(nn.Module):
    d2t: torch.Tensor  # buffers, registered in __init__
    t2d: torch.Tensor

    def __init__(self, config: Eagle3Config, init: bool = True) -> None:
        """``init=False``: the linears' weights are left uninitialised, for a caller that loads
        every weight next (a checkpoint, a payload): their random init was ~45 of a checkpoint
        load's ~57 ms, CPU that a swap's load takes beside serving."""
        super().__init__()
        c = config
        linear = nn.Linear if init else functools.partial(skip_init, nn.Linear)
        self.config = c
        self.version = 0
        # Per-depth acceptance measured on held-out traffic when this version was made (aurora
        # train, the online gate); it seeds the draft-length policy when the head is loaded.
        self.heldout_alpha: tuple[float, ...] | None = None
        # ... measured on drafts of this many branches at depth 1 (1: chains). A tree's depth-1
        # rate is far above a chain's, so the policy takes the rates only at the width it serves.
        # None: not recorded (manifests before session 61).
        self.heldout_width: int | None = None
        h, d = c.hidden_size, c.head_dim
        self.fc = linear(3 * h, h, bias=False)
        self.embed_norm = RMSNorm(h, c.rms_norm_eps)
        self.hidden_norm = RMSNorm(h, c.rms_norm_eps)
        self.qkv = linear(2 * h, (c.num_heads + 2 * c.num_kv_heads) * d, bias=False)
        self.o_proj = linear(c.num_heads * d, h, bias=False)
        self.post_attn_norm = RMSNorm(h, c.rms_norm_eps)
        self.gate_up = linear(h, 2 * c.intermediate_size, bias=False)
        self.down = linear(c.intermediate_size, h, bias=False)
        self.norm = RMSNorm(h, c.rms_norm_eps)
        self.lm_head = linear(h, c.draft_vocab_size, bias=False)
        self.register_buffer("d2t", default_draft_vocab(c))
        self.register_buffer("t2d", target_to_draft(self.d2t, c.target_vocab_size),
                             persistent=False)
        # A plain attribute, not a buffer: module.to(bfloat16) would round the frequencies and
        # make a bf16 serving head disagree with its fp32 training twin at long positions.
        self._inv_freq = rope_inv_freq(d, c.rope_theta)
        # Serving heads on CPU: packed copies of the linears (use_cpu_kernels), keyed by layer.
        self._packed: dict[str, tuple[torch.Tensor, tuple[int, int], CpuLinear]] = {}

    _LINEARS = ("fc", "qkv", "o_proj", "gate_up", "down", "lm_head")

    def use_cpu_kernels(self, bf16_weights: bool = False) -> bool:
        """Serving on CPU: run the linears through packed weight copies (cpu_linear.py;
        ``python scripts/linear_kernels.py`` measures both). The copies are used only without
        autograd (serving runs under no_grad; training keeps plain linears so gradients flow),
        and a copy is dropped as soon as its weight changes (an optimizer step, set_vocab), so a
        stale copy is never used. ``bf16_weights``: float32 weights' copies in bfloat16 where the
        row kernel runs them (half the bytes a draft step reads; the head then proposes as its
        rounded weights would). A no-op off CPU or without the kernels; returns whether the
        head is packed."""
        if self.fc.weight.device.type != "cpu" or not packed_kernels_available():
            return False
        for name in self._LINEARS:
            weight = getattr(self, name).weight
            if (name not in self._packed or not self._fresh(name, weight)
                    or self._packed[name][2].bf16_weights != bf16_weights):
                self._packed[name] = (weight, (weight._version, weight.data_ptr()),
                                      CpuLinear(weight, bf16_weights=bf16_weights))
        return True

    def cpu_kernels(self) -> str:
        """The copies serving reads now, in runtime.draft_kernels' names: ``F.linear`` (none),
        ``packed``, or ``packed bf16`` (bfloat16 row-kernel copies; a host without the row kernel
        ignores the request for them, so this reads the copies, not the request)."""
        copies = [c for _, _, c in self._packed.values()]
        if not copies:
            return "F.linear"
        return "packed bf16" if any(c.row and c.row.bf16_weights for c in copies) else "packed"

    def linear_weights(self) -> list[torch.Tensor]:
        """The weights use_cpu_kernels packs (what runtime.draft_kernels times)."""
        return [getattr(self, name).weight for name in self._LINEARS]

    def _fresh(self, name: str, weight: torch.Tensor) -> bool:
        w, stamp, _ = self._packed[name]
        return w is weight and (weight._version, weight.data_ptr()) == stamp

    def _linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        layer = getattr(self, name)
        if name in self._packed:
            if not self._fresh(name, layer.weight):
                del self._packed[name]  # the weight changed: the copy is stale for good
            elif not torch.is_grad_enabled():
                return self._packed[name][2](x)
        return layer(x)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_packed"] = {}  # packed copies are a cache: never pickled or deep-copied
        return state

    @staticmethod
    def random(config: Eagle3Config, seed: int = 0, std: float = 0.02) -> Eagle3Head:
        """Day-0 head: small normal init so a blank head's logits are near uniform."""
        head = Eagle3Head(config)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in head.named_parameters():
                if not name.endswith("norm.weight"):
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        return head

    def new_cache(self, batch: int = 1, chunk: int = 256) -> DraftCache:
        p = self.fc.weight
        return DraftCache(batch, self.config.num_kv_heads, self.config.head_dim, p.device, p.dtype,
                          chunk)

    def fuse(self, fused_hidden: torch.Tensor) -> torch.Tensor:
        """(..., 3H) concatenated low/mid/high target layers -> (..., H) draft hidden input."""
        return self._linear("fc", fused_hidden)

    def forward(self, hidden: torch.Tensor, token_embeds: torch.Tensor, positions: torch.Tensor,
                cache: DraftCache | None = None,
                mask: torch.Tensor | WindowBlocks | None = None,
                last_only: bool = False, lm_rows: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden, token_embeds (B, T, H), positions (B, T) -> (out_hidden (B, T, H) pre-norm,
        logits (B, T, V_draft)); logits of the last position only, (B, 1, V), if ``last_only``;
        over ``lm_rows`` instead of lm_head's weight, (B, T, len(lm_rows)), if given: rows of it
        gathered by the caller (training on a subset of the draft vocabulary, flywheel/losses.py).

        Without ``cache`` the T inputs attend causally to each other (training). With ``cache``
        the new keys are appended and the queries attend causally over cache + new entries.
        ``mask`` (B or 1, 1, T, S) bool, S = keys after the append, overrides the causal default
        (tree drafts, training-time-test masks); a ``WindowBlocks`` (B = 1) gives that mask
        block by block (packed training windows, models/blocks.py)."""
        b, t, _ = hidden.shape
        c, d = self.config, self.config.head_dim
        x = torch.cat((self.embed_norm(token_embeds), self.hidden_norm(hidden)), dim=-1)
        kv = c.num_kv_heads * d
        qkv = self._linear("qkv", x)
        fused_rope = row_ops.applies(qkv)  # serving on CPU in float32: q and k in one C call
        if fused_rope:
            row_ops.rope_at_(qkv, c.num_heads + c.num_kv_heads, d, positions, self._inv_freq)
        q, k, v = qkv.split((c.num_heads * d, kv, kv), -1)
        q = q.view(b, t, c.num_heads, d).transpose(1, 2)
        k = k.view(b, t, c.num_kv_heads, d).transpose(1, 2)
        v = v.view(b, t, c.num_kv_heads, d).transpose(1, 2)
        if not fused_rope:
            if self._inv_freq.device != positions.device:
                self._inv_freq = self._inv_freq.to(positions.device)
            cos, sin = rope_cos_sin(positions, self._inv_freq, q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        start = 0
        if cache is not None:
            start = cache.length
            k, v = cache.append(k, v)
        if mask is None and t > 1:  # a single query may see every key: no mask needed
            mask = causal_mask(start, t, hidden.device)
        attn = mask.attend(q, k, v) if isinstance(mask, WindowBlocks) else attend(q, k, v, mask)
        h = hidden + self._linear("o_proj", attn.transpose(1, 2).reshape(b, t, c.num_heads * d))
        gate, up = self._linear("gate_up", self.post_attn_norm(h)).chunk(2, dim=-1)
        h = h + self._linear("down", F.silu(gate) * up)
        out = self.norm(h[:, -1:] if last_only else h)
        if lm_rows is not None:
            return h, F.linear(out, lm_rows)
        return h, self._linear("lm_head", out)

    def set_vocab(self, d2t: torch.Tensor) -> None:
        """Replace the draft vocabulary. lm_head rows of tokens in both vocabularies are kept, new
        rows start at zero. lm_head becomes a new Parameter: rebuild optimizers afterwards."""
        c = self.config
        d2t = torch.as_tensor(d2t, dtype=torch.long).to(self.d2t.device).flatten()
        _check_d2t(d2t, c.target_vocab_size)
        old = self.t2d[d2t]  # old draft row of each new token, -1 when new
        w = self.lm_head.weight
        with torch.no_grad():
            new_w = carry_rows(w, old)
        self.lm_head = nn.Linear(w.shape[1], len(d2t), bias=False, device=w.device, dtype=w.dtype)
        self.lm_head.weight = nn.Parameter(new_w, requires_grad=w.requires_grad)
        self.d2t = d2t
        self.t2d = target_to_draft(d2t, c.target_vocab_size)
        self.config = dataclasses.replace(c, draft_vocab_size=len(d2t))

    def rates_at(self, width: int) -> tuple[float, ...] | None:
        """The per-depth acceptance this head brings for a draft-length policy that drafts
        ``width`` branches: its held-out rates when they were measured at that width (or the
        width is not recorded), else None (the policy's generic prior). Why: a top-3 tree's
        depth-1 rate is far above a chain's, so chain rates made a tree look like it did not
        pay, and tree rates a chain."""
        if self.heldout_alpha is None or self.heldout_width in (None, width):
            return self.heldout_alpha
        log.info("draft version %d's held-out acceptance was measured at width %d, serving "
                 "drafts width %d: the policy starts from its generic prior", self.version,
                 self.heldout_width, width)
        return None

    # ---- persistence: safetensors + JSON manifest, never pickle (drafters/head_files.py) ----

    def save(self, path_dir: str | os.PathLike) -> None:
        """Write head.safetensors and head.json, each atomically (``head_files.save_head``)."""
        from aurora_spec.drafters.head_files import save_head

        save_head(self, path_dir)

    @staticmethod
    def load(path_dir: str | os.PathLike, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> Eagle3Head:
        """Load a saved head; ValueError on a missing, corrupt or inconsistent checkpoint."""
        from aurora_spec.drafters.head_files import load_head

        return load_head(path_dir, device, dtype)


def target_to_draft(d2t: torch.Tensor, target_vocab: int) -> torch.Tensor:
    """t2d: each target token's row in the draft vocabulary ``d2t``, -1 outside it."""
    t2d = torch.full((target_vocab,), -1, dtype=torch.long, device=d2t.device)
    t2d[d2t] = torch.arange(len(d2t), device=d2t.device)
    return t2d


def _check_d2t(d2t: torch.Tensor, target_vocab: int) -> None:
    if d2t.dtype != torch.long or d2t.dim() != 1 or len(d2t) == 0:
        raise ValueError("d2t must be a non-empty 1-D long tensor")
    if int(d2t.min()) < 0 or int(d2t.max()) >= target_vocab:
        raise ValueError(f"d2t has ids outside the target vocabulary [0, {target_vocab})")
    if len(torch.unique(d2t)) != len(d2t):
        raise ValueError("d2t has duplicate target ids")
