"""Tiny random-weight target models built in seconds, for tests that need many cases."""

from __future__ import annotations

import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from aurora_spec.drafters.eagle3_head import Eagle3Config, Eagle3Head
from aurora_spec.models.transformer import DecoderModel, from_hf_model


def tiny_hf_llama(seed: int = 0, vocab: int = 96, layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=96,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    # Sharpen the output distribution so greedy decoding has few near-ties.
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(8.0)
    return model


def tiny_hf_gemma3(seed: int = 0, vocab: int = 96, layers: int = 4,
                   sliding_window: int = 8) -> Gemma3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=48, intermediate_size=96,
                           num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                           sliding_window=sliding_window, query_pre_attn_scalar=16,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg.layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention"
                       for i in range(layers)]
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # Gemma norms are (1 + w) with w initialised to 0: add variety
                p.add_(torch.randn_like(p) * 0.1)
    return model


def tiny_target(kind: str = "llama", seed: int = 0, **kw) -> tuple[DecoderModel, torch.nn.Module]:
    hf = tiny_hf_llama(seed, **kw) if kind == "llama" else tiny_hf_gemma3(seed, **kw)
    return from_hf_model(hf), hf


def head_for(model: DecoderModel, std: float = 0.3, seed: int = 0,
             draft_vocab: int = 80) -> Eagle3Head:
    """A random EAGLE-3 draft head sized for `model` (a tiny target), in eval mode."""
    cfg = Eagle3Config.from_spec(model.spec, draft_vocab)
    return Eagle3Head.random(cfg, seed=seed, std=std).eval()
