"""Our decoder forward (fast path) against transformers' forward (slow reference)."""

from __future__ import annotations

import pytest
import torch

from aurora_spec.models.cpu_linear import packed_kernels_available
from aurora_spec.models.runner import CacheConfig, TargetRunner
from aurora_spec.types import Proposal
from tests.tiny_models import tiny_target


def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_prefill_matches_transformers(kind: str) -> None:
    model, hf = tiny_target(kind)
    runner = TargetRunner(model, CacheConfig(max_slots=2, capacity=64))
    ids = torch.randint(3, 96, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    slot = runner.allocate()
    out = runner.prefill(slot, ids)
    ref = hf_logits(hf, ids)
    torch.testing.assert_close(out.logits[0, -1], ref[-1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_chain_and_tree_verify_match_full_forward(kind: str) -> None:
    """Each verified node's logits equal a from-scratch forward over its own branch, also past
    Gemma's sliding window (8 tokens here)."""
    model, hf = tiny_target(kind)
    runner = TargetRunner(model, CacheConfig(max_slots=1, capacity=64))
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 96, (12,), generator=g).tolist()
    slot = runner.allocate()
    runner.prefill(slot, ids[:-1])
    root = ids[-1]
    tree = Proposal((10, 11, 12, 13, 14), (-1, -1, 0, 1, 2))  # two branches below the root
    out = runner.verify(slot, root, tree)
    branches = {0: [10], 1: [11], 2: [10, 12], 3: [11, 13], 4: [10, 12, 14]}
    ref_root = hf_logits(hf, ids)[-1]
    torch.testing.assert_close(out.logits[0, 0], ref_root, atol=1e-4, rtol=1e-4)
    for node, path in branches.items():
        ref = hf_logits(hf, ids + path)[-1]
        torch.testing.assert_close(out.logits[0, node + 1], ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_cache_after_rejection_equals_fresh_cache(kind: str) -> None:
    """Commit a tree path that is not a prefix; the cache must equal one built from scratch on the
    accepted sequence."""
    model, _ = tiny_target(kind)
    runner = TargetRunner(model, CacheConfig(max_slots=2, capacity=64))
    ids = list(range(3, 15))
    a = runner.allocate()
    runner.prefill(a, ids)
    tree = Proposal((20, 21, 22, 23), (-1, -1, 1, 2))
    runner.verify(a, 30, tree)
    runner.commit(a, (1, 2))  # keep root 30, then nodes 1 (21) and 2 (22)
    b = runner.allocate()
    runner.prefill(b, ids + [30, 21, 22])
    n = runner.length(a)
    assert n == runner.length(b) == len(ids) + 3
    for layer in range(model.spec.num_layers):
        torch.testing.assert_close(runner.cache.k[layer][a, :, :n], runner.cache.k[layer][b, :, :n],
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(runner.cache.v[layer][a, :, :n], runner.cache.v[layer][b, :, :n],
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_batched_ragged_verify_equals_single(kind: str) -> None:
    """One batched forward over requests with different cache lengths and draft shapes gives each
    request the logits and cache contents of its own single forward."""
    from aurora_spec.models.runner import VerifyItem

    model, _ = tiny_target(kind)
    batched = TargetRunner(model, CacheConfig(max_slots=3, capacity=64))
    single = TargetRunner(model, CacheConfig(max_slots=3, capacity=64))
    prompts = [list(range(3, 9)), list(range(10, 23)), [40, 41]]
    props = [Proposal.chain([5, 6, 7]), Proposal((8, 9, 10), (-1, -1, 0)), Proposal()]
    hb = [batched.allocate() for _ in prompts]
    hs = [single.allocate() for _ in prompts]
    for b, s_, p in zip(hb, hs, prompts, strict=True):
        batched.prefill(b, p)
        single.prefill(s_, p)
    outs = batched.verify_batch([VerifyItem(h, 50, pr) for h, pr in zip(hb, props, strict=True)])
    for h, s_, pr, out in zip(hb, hs, props, outs, strict=True):
        ref = single.verify(s_, 50, pr)
        assert out.logits.shape[1] == len(pr) + 1
        torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=1e-4)
        accepted = (0,) if len(pr) else ()
        batched.commit(h, accepted)
        single.commit(s_, accepted)
    # Releasing the first request moves the last cache row into its place; contents survive.
    batched.release(hb[0])
    single.release(hs[0])
    for h, s_ in zip(hb[1:], hs[1:], strict=True):
        n = batched.length(h)
        rb, rs = batched._row[h], single._row[s_]
        for layer in range(model.spec.num_layers):
            torch.testing.assert_close(batched.cache.k[layer][rb, :, :n],
                                       single.cache.k[layer][rs, :, :n], atol=1e-5, rtol=1e-5)



@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_cpu_kernels_give_the_same_logits(kind: str) -> None:
    """The model with oneDNN-packed linears computes the same function as with F.linear."""
    if not packed_kernels_available():
        pytest.skip("this PyTorch build has no oneDNN packed linear")
    plain, _ = tiny_target(kind)
    fast, _ = tiny_target(kind)
    fast.use_cpu_kernels()
    ids = list(range(3, 23))
    results = []
    for model in (plain, fast):
        runner = TargetRunner(model, CacheConfig(max_slots=1, capacity=64))
        slot = runner.allocate()
        results.append(runner.prefill(slot, ids).logits)
        for draft in ([], [31], [31, 32, 33, 34, 35]):
            out = runner.verify(slot, 30, Proposal.chain(draft))
            results.extend((out.logits, out.fused_hidden))
    half = len(results) // 2
    for a, b in zip(results[:half], results[half:], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
