"""Export a draft head in the EAGLE-3 checkpoint layout (config.json + model.safetensors), the
format EAGLE-3 drafts are published in and that EAGLE-3-aware servers load.

Mapping (see drafters/eagle3_head.py): ``qkv`` splits into q_proj/k_proj/v_proj, ``gate_up``
into gate_proj/up_proj; ``embed_norm`` is ``midlayer.input_layernorm``; ``d2t`` is stored as
offsets (d2t[i] - i) and ``t2d`` as a boolean mask over the target vocabulary.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from aurora_spec.atomic_files import atomic_write, atomic_write_text
from aurora_spec.drafters.eagle3_head import Eagle3Head


def eagle3_tensors(head: Eagle3Head) -> dict[str, torch.Tensor]:
    c = head.config
    d = c.head_dim
    q, k, v = head.qkv.weight.detach().float().split(
        (c.num_heads * d, c.num_kv_heads * d, c.num_kv_heads * d), dim=0)
    gate, up = head.gate_up.weight.detach().float().chunk(2, dim=0)
    d2t = head.d2t.detach().cpu()
    t2d = torch.zeros(c.target_vocab_size, dtype=torch.bool)
    t2d[d2t] = True
    out = {
        "fc.weight": head.fc.weight, "midlayer.self_attn.q_proj.weight": q,
        "midlayer.self_attn.k_proj.weight": k, "midlayer.self_attn.v_proj.weight": v,
        "midlayer.self_attn.o_proj.weight": head.o_proj.weight,
        "midlayer.mlp.gate_proj.weight": gate, "midlayer.mlp.up_proj.weight": up,
        "midlayer.mlp.down_proj.weight": head.down.weight,
        "midlayer.input_layernorm.weight": head.embed_norm.weight,
        "midlayer.hidden_norm.weight": head.hidden_norm.weight,
        "midlayer.post_attention_layernorm.weight": head.post_attn_norm.weight,
        "norm.weight": head.norm.weight, "lm_head.weight": head.lm_head.weight,
    }
    out = {k: v.detach().float().cpu().contiguous() for k, v in out.items()}
    out["d2t"] = (d2t - torch.arange(len(d2t))).contiguous()
    out["t2d"] = t2d
    return out


def eagle3_config(head: Eagle3Head, max_positions: int = 2048) -> dict:
    c = head.config
    return {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama",
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim, "num_hidden_layers": 1, "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
        "max_position_embeddings": max_positions, "vocab_size": c.target_vocab_size,
        "draft_vocab_size": c.draft_vocab_size, "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(c.target_layers)},
        "aurora_draft_version": int(head.version),
    }


def export_eagle3(head: Eagle3Head, out_dir: str | os.PathLike, max_positions: int = 2048) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = eagle3_tensors(head)
    atomic_write(out / "model.safetensors",
                 lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write_text(out / "config.json", json.dumps(eagle3_config(head, max_positions), indent=2))
    return out
