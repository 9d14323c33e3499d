"""On the bundled SmolLM2: every drafter's greedy output equals target-only greedy output, and our
target-only engine equals transformers' own greedy generate() (float32)."""

from __future__ import annotations

import pytest
import torch

from aurora_spec.cli import encode_prompt
from aurora_spec.config import DrafterConfig
from aurora_spec.drafters.policy import PolicyConfig
from aurora_spec.engine.engine import Engine, EngineConfig
from aurora_spec.models.loader import load_hf_model
from aurora_spec.models.runner import CacheConfig, TargetRunner
from aurora_spec.runtime import make_drafter
from aurora_spec.types import SamplingParams

pytestmark = pytest.mark.integration

PROMPTS = [
    "Summarize: The cat sat on the mat. The cat was happy on the mat all day long.",
    "Write a Python function that returns the sum of a list.",
    "What is 12 times 7?",
]
MAX_TOKENS = 24


def engine_for(model, drafter_name: str, fixed: int | None) -> Engine:
    drafter = make_drafter(DrafterConfig(drafter_name, draft_vocab=4096), model)
    runner = TargetRunner(model, CacheConfig(max_slots=2, capacity=512))
    return Engine(runner, drafter, EngineConfig(PolicyConfig(max_draft=5, fixed_draft=fixed),
                                                calibrate=False))


@pytest.fixture(scope="module")
def reference(smollm2_target):
    info, tok, model = smollm2_target
    eng = engine_for(model, "none", None)
    stops = tuple(info.eos_token_ids)
    out = {}
    for p in PROMPTS:
        ids = encode_prompt(tok, p, chat=True)
        res = eng.generate(ids, SamplingParams(max_tokens=MAX_TOKENS, stop_token_ids=stops))
        out[p] = (ids, list(res.token_ids))
    return out


def test_target_only_equals_transformers_generate(smollm2_target, reference) -> None:
    info, _, _ = smollm2_target
    hf = load_hf_model(info.dir)
    for ids, want in reference.values():
        with torch.inference_mode():
            gen = hf.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                              eos_token_id=list(info.eos_token_ids), pad_token_id=0)
        hf_tokens = gen[0, len(ids):].tolist()
        if hf_tokens and hf_tokens[-1] in info.eos_token_ids:
            hf_tokens = hf_tokens[:-1]  # generate() keeps the EOS; our engine stops before it
        assert hf_tokens == want


@pytest.mark.parametrize("drafter", ["ngram", "eagle3"])
@pytest.mark.parametrize("fixed", [None, 4])
def test_drafters_equal_target_only(smollm2_target, reference, drafter: str,
                                    fixed: int | None) -> None:
    info, _, model = smollm2_target
    eng = engine_for(model, drafter, fixed)
    for ids, want in reference.values():
        res = eng.generate(ids, SamplingParams(max_tokens=MAX_TOKENS,
                                               stop_token_ids=tuple(info.eos_token_ids)))
        assert list(res.token_ids) == want
