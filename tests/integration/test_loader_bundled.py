"""The bundled default model: resolves from the cache, loads, tokenizes, applies ChatML."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from aurora_spec.models.loader import (
    MARKER,
    load_hf_model,
    load_tokenizer,
    model_info,
    resolve_model,
)

pytestmark = pytest.mark.integration


def test_cached_dir_is_reused(smollm2_dir: Path) -> None:
    marker = (smollm2_dir / MARKER).stat().st_mtime_ns
    t0 = time.perf_counter()
    assert resolve_model("smollm2-135m") == smollm2_dir
    assert time.perf_counter() - t0 < 1.0  # no second conversion
    assert (smollm2_dir / MARKER).stat().st_mtime_ns == marker
    assert not list(smollm2_dir.parent.glob(".smollm2-135m.tmp-*"))


def test_model_info(smollm2_dir: Path) -> None:
    info = model_info(smollm2_dir)
    assert info.architecture == "LlamaForCausalLM"
    assert (info.num_layers, info.hidden_size, info.vocab_size) == (30, 576, 49152)
    assert info.context_length == 8192
    assert info.eos_token_ids == (2,)  # <|im_end|>


def test_tokenizer_round_trip_and_chat_template(smollm2_dir: Path) -> None:
    tok = load_tokenizer(smollm2_dir)
    text = "Speculative decoding: draft, then verify!"
    ids = tok(text).input_ids
    assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(2) == "<|im_end|>"
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert "<|im_start|>user\nHi<|im_end|>\n" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_model_loads_and_predicts(smollm2_dir: Path) -> None:
    tok = load_tokenizer(smollm2_dir)
    model = load_hf_model(smollm2_dir)
    assert not model.training and model.dtype == torch.float32
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_id = int(model(ids).logits[0, -1].argmax())
    assert tok.decode([next_id]).strip() == "Paris"
