"""The eagle3 + lookup hybrid: trie merge of the lookup chain into the head's tree, lossless
greedy decoding through the engine, per-source attribution, swaps through the hybrid."""

from __future__ import annotations

import pytest
import torch

from aurora_spec.config import DrafterConfig
from aurora_spec.drafters.hybrid import LookupHybrid, first_branch, merge_chain
from aurora_spec.drafters.ngram import NgramDrafter
from aurora_spec.drafters.policy import PolicyConfig
from aurora_spec.engine.engine import Engine, EngineConfig
from aurora_spec.flywheel.publisher import Publisher
from aurora_spec.models.runner import CacheConfig, TargetRunner
from aurora_spec.runtime import NARROW_COST_STEP, make_drafter, narrow_beside_lookup
from aurora_spec.types import Proposal, SamplingParams, VerifyResult
from tests.tiny_models import head_for, tiny_target


def test_merge_chain_shares_prefixes_and_keeps_head_ids() -> None:
    # head tree: top-2 at depth 1 (10, 20), each extended once (11 under 10, 21 under 20)
    tree = Proposal((10, 20, 11, 21), (-1, -1, 0, 1), None, 7)
    merged, path = merge_chain(tree, (20, 21, 22))  # shares 20 -> 21, then adds 22
    assert merged.tokens[:4] == tree.tokens and merged.parents[:4] == tree.parents
    assert path == (1, 3, 4) and merged.tokens[4] == 22 and merged.parents[4] == 3
    assert merged.draft_version == 7
    merged, path = merge_chain(tree, (30, 11))  # a new first token: a new branch at the root
    assert path == (4, 5) and merged.parents[4:] == (-1, 4)
    merged, path = merge_chain(tree, ())
    assert merged == tree and path == ()
    merged, path = merge_chain(Proposal(), (5, 6))
    assert merged.is_chain and merged.tokens == (5, 6) and path == (0, 1)


def test_first_branch_keeps_the_top_chain() -> None:
    tree = Proposal.branches([10, 20, 30, 11, 21, 31], 3, draft_version=4)  # 3 branches, depth 2
    top = first_branch(tree)
    assert top.tokens == (10, 11) and top.parents == (-1, 0) and top.draft_version == 4
    assert first_branch(Proposal()) == Proposal()
    # a merged tree (lookup nodes under branch 1) keeps only branch 0's subtree
    merged, _ = merge_chain(tree, (20, 21, 22))
    assert first_branch(merged).tokens == (10, 11)


def test_narrow_drops_the_heads_siblings_only_where_the_chain_adds_nodes() -> None:
    """``narrow``: a chain that adds nodes is verified beside the head's top-1 chain; a chain
    lying wholly inside the head's tree leaves the tree as it was."""

    class Fixed:  # a drafter returning one proposal whatever it is asked
        tree_width = 1

        def __init__(self, prop: Proposal) -> None:
            self.prop = prop

        def propose(self, *a, **kw) -> Proposal:
            return self.prop

        def start(self, *a) -> None: ...

    tree = Proposal.branches([10, 20, 30, 11, 21, 31], 3)
    cases = [((20, 21), 6, 0), ((20, 21, 22), 5, 1), ((40,), 3, 1), ((), 6, 0)]
    for chain, size, narrowed in cases:
        hybrid = LookupHybrid(Fixed(tree), Fixed(Proposal.branches(list(chain), 1)), narrow=True)
        prop = hybrid.propose("r", [1, 2], 2, SamplingParams(), limit=4)
        assert len(prop) == size and hybrid.counters.narrowed == narrowed, chain
        assert prop.tokens[:2] == ((10, 11) if narrowed else (10, 20))
        if narrowed:  # the chain is all there, below the root
            path = hybrid._pending["r"].lookup_nodes
            assert tuple(prop.tokens[i] for i in path) == chain
            assert hybrid._pending["r"].head_nodes == frozenset({0, 1})
            # greedy: the head is credited where a dropped branch had the target's token
            for target_token, credit in ((20, 1), (30, 1), (10, 0), (99, 0)):
                missed = VerifyResult((), (), target_token, False, len(prop))
                assert hybrid.policy_part("r", missed) == (2, credit), target_token
            on_top = VerifyResult((0, 1), (10, 11), 5, True, len(prop))
            assert hybrid.policy_part("r", on_top) == (2, 2)


def _engine(model, drafter, fixed: int | None = 3) -> Engine:
    runner = TargetRunner(model, CacheConfig(max_slots=2, capacity=256))
    return Engine(runner, drafter, EngineConfig(PolicyConfig(max_draft=5, fixed_draft=fixed),
                                                calibrate=False))


def _prompts(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(4):
        p = torch.randint(3, 96, (int(torch.randint(4, 16, (1,), generator=g)),), generator=g)
        out.append(p.tolist() * 2)  # repeated spans: the lookup chain has matches
    return out


# a fixed draft length, and the adaptive policy; the head's whole tree, and only its first
# branch where the chain adds nodes
@pytest.mark.parametrize("narrow", [False, True])
@pytest.mark.parametrize("fixed", [3, None])
def test_hybrid_is_lossless_and_attributes_each_source(fixed: int | None, narrow: bool) -> None:
    model, _ = tiny_target("llama", seed=5)
    base = _engine(model, None)
    prompts = _prompts(1)
    params = SamplingParams(max_tokens=40)
    want = [list(base.generate(p, params).token_ids) for p in prompts]
    drafter = make_drafter(DrafterConfig("eagle3", draft_vocab=64, draft_dtype="float32",
                                         lookup_narrow=narrow), model)
    assert isinstance(drafter, LookupHybrid) and drafter.narrow == narrow
    engine = _engine(model, drafter, fixed)
    before = dict(vars(drafter.counters))
    steps = []
    observe = drafter._count

    def checked(rid, accepted, by_head, by_lookup, step):
        # The accepted path runs through shared nodes, then one source's own nodes only.
        assert accepted == max(by_head, by_lookup)
        steps.append((accepted, by_head, by_lookup, len(step.lookup_nodes)))
        observe(rid, accepted, by_head, by_lookup, step)

    drafter._count = checked  # type: ignore[method-assign]
    got = []
    for i, p in enumerate(prompts):
        out = engine.generate(p, params, request_id=f"r{i}")
        got.append(list(out.token_ids))
        steps_i, head_i, lookup_i = drafter.request_counts(f"r{i}")
        assert steps_i >= 1 and head_i <= steps_i * 5 and lookup_i <= steps_i * 5
        # The engine's own per-request stats carry the head's share (the server's tau_head).
        assert out.stats.head_accepted == head_i <= out.stats.accepted
    assert got == want
    st = drafter.stats()
    assert before["steps"] == 0 and st["steps"] == len(steps) > 0
    assert st["lookup_steps"] > 0 and st["accepted_lookup"] > 0  # repeated prompts: matches
    assert st["accepted"] == sum(s[0] for s in steps)
    assert st["tau"] >= max(st["tau_head_alone"], st["tau_lookup_alone"])
    assert (st["narrowed"] > 0) == narrow


def test_narrow_auto_follows_the_measured_cost_step() -> None:
    """``lookup_narrow`` None: narrow exactly where the packed linears' measured cost for a widened
    tree's rows over a narrowed one's reaches the threshold; a given choice is not measured."""
    model, _ = tiny_target("llama", seed=5)
    assert narrow_beside_lookup(model, True) == (True, None)
    assert narrow_beside_lookup(model, False) == (False, None)
    narrow, step = narrow_beside_lookup(model, None)
    if model.cpu_lm_head is None:  # no packed kernels: more rows cost next to nothing
        assert (narrow, step) == (False, None)
    else:
        assert step is not None and step > 0 and narrow == (step >= NARROW_COST_STEP)


def test_sampled_head_chain_is_not_merged() -> None:
    """A sampled chain carries draft_probs; a point-mass sibling would break the verifier's rule
    for stochastic siblings, so the hybrid returns the head's chain alone."""
    model, _ = tiny_target("llama", seed=5)
    drafter = make_drafter(DrafterConfig("eagle3", draft_vocab=64, tree_width=1,
                                         draft_dtype="float32"), model)
    engine = _engine(model, drafter, fixed=3)
    prompt = [5, 6, 7, 8] * 4
    engine.generate(prompt, SamplingParams(max_tokens=20, temperature=1.0, seed=0))
    assert drafter.counters.lookup_steps == 0 and drafter.counters.steps > 0
    engine.generate(prompt, SamplingParams(max_tokens=20))  # greedy: merged again
    assert drafter.counters.lookup_steps > 0


def test_swaps_through_the_hybrid_are_lossless() -> None:
    model, _ = tiny_target("llama", seed=4)
    base = _engine(model, None)
    from aurora_spec.drafters.eagle3 import Eagle3Drafter

    learned = Eagle3Drafter(head_for(model, std=0.3, seed=0), model.embed.weight, tree_width=2)
    drafter = LookupHybrid(learned, NgramDrafter(tree_width=1))
    engine = _engine(model, drafter)
    pub = Publisher(drafter, engine, model, None)
    prompts = _prompts(2)[:2]
    params = SamplingParams(max_tokens=40)
    want = [list(base.generate(p, params).token_ids) for p in prompts]
    seqs = [engine.add_request(p, params) for p in prompts]
    steps, version = 0, 1
    while not all(s.finished for s in seqs):
        engine.step()
        steps += 1
        if steps % 3 == 0:
            head = head_for(model, std=0.3, seed=version)
            head.version = version
            pub.swap(head, watch=False, reason="test")
            version += 1
    assert [list(s.output) for s in seqs] == want
    assert drafter.head.version == version - 1 and learned.head is drafter.head


def test_lookup_must_be_a_chain() -> None:
    with pytest.raises(ValueError, match="chains"):
        LookupHybrid(object(), NgramDrafter(tree_width=2))


def test_head_is_judged_on_its_own_part() -> None:
    """With the head drafting nothing (k = 0) the lookup chain still drafts every step, and what
    it gets accepted is not credited to the head version (the publisher's rollback judges heads
    by the trace's ``policy_part``, the policy sizes the head by it)."""
    model, _ = tiny_target("llama", seed=5)
    drafter = make_drafter(DrafterConfig("eagle3", draft_vocab=64, draft_dtype="float32"), model)
    outcomes = []
    engine = _engine(model, drafter, fixed=0)
    engine.trace_sink = lambda t: outcomes.append(
        (t.policy_part, t.result.num_accepted, len(t.proposal)))
    for p in _prompts(3):
        engine.generate(p, SamplingParams(max_tokens=40))
    assert outcomes and all(own == (0, 0) for own, _, _ in outcomes)
    assert sum(acc for _, acc, _ in outcomes) > 0  # the lookup chain was accepted
    assert drafter.stats()["accepted_head"] == 0


def test_draft_cost_is_the_heads_time_not_the_lookup_bookkeeping() -> None:
    """The policy sizes the head's draft, so its cost per depth is timed on the head alone: the
    lookup chain's work is paid on every step whatever k is, and counted in would make every
    depth look dearer (here a lookup slowed to 30 ms a step)."""
    import time

    model, _ = tiny_target("llama", seed=5)
    drafter = make_drafter(DrafterConfig("eagle3", draft_vocab=64, draft_dtype="float32"), model)
    lookup_propose = drafter.lookup.propose

    def slow_lookup(*a, **kw):
        time.sleep(0.03)
        return lookup_propose(*a, **kw)

    drafter.lookup.propose = slow_lookup
    engine = _engine(model, drafter, fixed=4)
    engine.costs.draft_token_s = 1e-3  # a known start (no calibration in these engines)
    engine.generate(_prompts(2)[0], SamplingParams(max_tokens=40))
    assert 0 < drafter.last_costly_s < 0.03
    assert engine.costs.draft_token_s < 3e-3  # 30 ms / 4 per depth would have been 7.5 ms
