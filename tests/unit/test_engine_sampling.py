"""At temperature > 0 speculation keeps the target's output distribution (engine level).

The exact marginal of the 2nd and 3rd generated tokens is computed by enumerating the tiny
model's branches; samples drawn through the speculative engine must fit it (chi-square, fixed
seeds so the test is deterministic)."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from aurora_spec.config import DrafterConfig
from aurora_spec.drafters.policy import PolicyConfig
from aurora_spec.engine.engine import Engine, EngineConfig
from aurora_spec.engine.sampling import processed_probs
from aurora_spec.models.runner import CacheConfig, TargetRunner
from aurora_spec.runtime import make_drafter
from aurora_spec.types import SamplingParams
from tests.scripted_drafter import ScriptedDrafter
from tests.tiny_models import tiny_target

VOCAB = 12
PROMPT = [3, 7, 5, 9]


def exact_marginals(hf, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    def dist(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return processed_probs(hf(torch.tensor([ids])).logits[0, -1], params).double()

    p1 = dist(PROMPT)
    p2 = torch.zeros(VOCAB, dtype=torch.float64)
    p3 = torch.zeros(VOCAB, dtype=torch.float64)
    for a in range(VOCAB):
        pa = dist(PROMPT + [a])
        p2 += p1[a] * pa
        for b in range(VOCAB):
            p3 += p1[a] * pa[b] * dist(PROMPT + [a, b])
    return p2, p3


def fit(samples: list[int], probs: torch.Tensor) -> float:
    observed = torch.bincount(torch.tensor(samples), minlength=VOCAB).double()
    expected = probs * len(samples)
    keep = expected >= 5  # merge rare cells so the chi-square approximation holds
    obs = torch.cat([observed[keep], observed[~keep].sum(0, keepdim=True)])
    exp = torch.cat([expected[keep], expected[~keep].sum(0, keepdim=True)])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue)


@pytest.mark.parametrize("drafter_kind", ["scripted-tree", "eagle3"])
def test_sampling_with_speculation_keeps_target_distribution(drafter_kind: str) -> None:
    model, hf = tiny_target("llama", seed=4, vocab=VOCAB)
    with torch.no_grad():
        model.embed.weight.mul_(0.25)  # soften: many tokens get real probability
        hf.model.embed_tokens.weight.mul_(0.25)
    params = SamplingParams(max_tokens=3, temperature=1.0, top_k=8)
    p2, p3 = exact_marginals(hf, params)
    if drafter_kind == "eagle3":
        drafter = make_drafter(DrafterConfig("eagle3", draft_vocab=VOCAB), model)
    else:
        drafter = ScriptedDrafter([], VOCAB, tree=True, corrupt=1.0)
    engine = Engine(TargetRunner(model, CacheConfig(1, 32)), drafter,
                    EngineConfig(PolicyConfig(max_draft=2, fixed_draft=2), calibrate=False))
    second, third = [], []
    for seed in range(1000):
        out = engine.generate(PROMPT, SamplingParams(max_tokens=3, temperature=1.0, top_k=8,
                                                     seed=seed)).token_ids
        second.append(out[1])
        third.append(out[2])
    assert fit(second, p2) > 1e-3
    assert fit(third, p3) > 1e-3
    # Power check: the marginal of the 2nd token is not the 1st token's distribution.
    assert fit(second, exact_marginals(hf, params)[0].roll(1)) < 1e-3
