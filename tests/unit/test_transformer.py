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


def _decode(runner: TargetRunner, ids: list[int]) -> list[torch.Tensor]:
    slot = runner.allocate()
    out = [runner.prefill(slot, ids).logits]
    for token in (30, 31, 32):
        out.append(runner.verify(slot, token, Proposal.chain([])).logits)
        runner.commit(slot, ())
    return out


def test_a_runner_chooses_its_kernels_on_a_shared_model() -> None:
    """Engines share one model (the bench's arms): a runner with ``packed_kernels=False`` runs
    F.linear even though the model holds packed copies, exactly as a model without them does,
    and the default runner reads the packed copies."""
    if not packed_kernels_available():
        pytest.skip("this PyTorch build has no oneDNN packed linear")
    plain, _ = tiny_target("llama")
    shared, _ = tiny_target("llama")
    shared.use_cpu_kernels()
    ids = list(range(3, 23))
    reference = _decode(TargetRunner(plain, CacheConfig(1, 64)), ids)
    as_plain = _decode(TargetRunner(shared, CacheConfig(1, 64), packed_kernels=False), ids)
    as_packed = _decode(TargetRunner(shared, CacheConfig(1, 64)), ids)
    for a, b, c in zip(reference, as_plain, as_packed, strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(c, a, atol=1e-5, rtol=1e-5)  # same function, other rounding
    fast = shared.cpu_lm_head
    assert fast is not None
    final = torch.randn(1, 2, plain.spec.hidden_size)
    assert torch.equal(shared.logits(final), fast(final).float())
    assert torch.equal(shared.logits(final, packed=False), plain.logits(final))


def test_target_kernels_only_free_a_single_request_target_only_engine(caplog) -> None:
    """runtime.target_kernels: drafting, batching or a pinned choice keep the packed kernels
    (row-independent results: the lossless guarantee); a target-only engine serving one
    request at a time takes the faster kernel by measurement and logs the figures."""
    import logging

    from aurora_spec.runtime import target_kernels

    if not packed_kernels_available():
        pytest.skip("this PyTorch build has no oneDNN packed linear")
    bare, _ = tiny_target("llama")
    assert target_kernels(bare, drafting=False, max_slots=1) is False  # nothing packed to read
    model, _ = tiny_target("llama")
    model.use_cpu_kernels()
    assert target_kernels(model, drafting=True, max_slots=1) is True
    assert target_kernels(model, drafting=False, max_slots=4) is True
    assert target_kernels(model, drafting=False, max_slots=1, choice="packed") is True
    with pytest.raises(ValueError, match="auto or packed"):
        target_kernels(model, drafting=False, max_slots=1, choice="plain")
    with caplog.at_level(logging.INFO, logger="aurora_spec.runtime"):
        chosen = target_kernels(model, drafting=False, max_slots=1)
    line = next(r.getMessage() for r in caplog.records if "target kernels" in r.getMessage())
    assert ("packed" if chosen else "F.linear") in line.split("one request at a time): ")[1][:8]
