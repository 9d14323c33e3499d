"""NgramDrafter: prompt lookup, cross-request memory, bounds, trees, lifecycle (no model needed)."""

from __future__ import annotations

import random

import torch

from aurora_spec.drafters.base import Drafter
from aurora_spec.drafters.ngram import NgramDrafter, _bumped
from aurora_spec.types import Proposal, SamplingParams, StepTrace, VerifyResult

GREEDY = SamplingParams()
EMPTY_HIDDEN = torch.zeros(0, 3)


def _start(d: NgramDrafter, rid: str, prompt: list[int], first: int) -> list[int]:
    d.start(rid, prompt, first, EMPTY_HIDDEN)
    return prompt + [first]


def test_is_a_drafter():
    d = NgramDrafter(size_by_acceptance=False)
    assert isinstance(d, Drafter)
    assert d.name == "ngram"


def test_prompt_lookup_copies_span():
    d = NgramDrafter(size_by_acceptance=False)
    prompt = [1, 2, 3, 10, 11, 12, 13, 14, 15, 4, 5, 6, 7, 3, 10]
    tokens = _start(d, "r", prompt, 11)  # ends with "3 10 11", seen before: copy what followed
    prop = d.propose("r", tokens, 4, GREEDY)
    assert prop.tokens == (12, 13, 14, 15)
    assert prop.is_chain and prop.draft_probs is None
    assert d.stats()["hits_local"] == 1


def test_prompt_lookup_prefers_longest_most_recent_match():
    d = NgramDrafter(min_n=1, max_n=3, size_by_acceptance=False)
    # "5 6" is followed by 7 at one place, and "4 5 6" by 8 at another: the 3-gram wins.
    tokens = [4, 5, 6, 8, 9, 0, 5, 6, 7, 1, 4, 5, 6]
    assert d.propose("r", tokens, 2, GREEDY).tokens == (8, 9)
    # Most recent occurrence of the same n-gram wins.
    tokens = [1, 2, 30, 0, 1, 2, 40, 0, 1, 2]
    assert d.propose("s", tokens, 1, GREEDY).tokens == (40,)


def test_local_copy_runs_past_the_end_with_overlap():
    d = NgramDrafter(size_by_acceptance=False)
    tokens = [9, 1, 2, 1, 2, 1, 2]  # period 2: the draft keeps the period
    assert d.propose("r", tokens, 5, GREEDY).tokens == (1, 2, 1, 2, 1)


def test_incremental_index_matches_fresh_index():
    rng = random.Random(0)
    seq = [rng.randrange(20) for _ in range(400)]
    inc, fresh = NgramDrafter(max_entries=0, size_by_acceptance=False), NgramDrafter(max_entries=0, size_by_acceptance=False)
    inc.start("r", seq[:50], seq[50], EMPTY_HIDDEN)
    for end in range(51, 400, 3):
        a = inc.propose("r", seq[:end], 6, GREEDY)
        b = fresh.propose(f"f{end}", seq[:end], 6, GREEDY)
        assert a.tokens == b.tokens


def test_cross_request_memory():
    d = NgramDrafter(size_by_acceptance=False)
    seen = [100, 101, 102, 103, 104, 105, 106, 107]
    tokens = _start(d, "a", [7, 8], 100)
    d.propose("a", tokens, 4, GREEDY)
    d.finish("a", [7, 8] + seen)
    assert "a" not in d._requests
    # A new request whose context ends with a seen n-gram (not in its own tokens before).
    tokens = _start(d, "b", [50, 51, 102], 103)
    prop = d.propose("b", tokens, 4, GREEDY)
    assert prop.tokens == (104, 105, 106, 107)
    s = d.stats()
    assert s["hits_global"] == 1 and s["hits_local"] == 0


def test_global_memory_prefers_most_frequent_continuation():
    d = NgramDrafter(min_n=2, max_n=2, size_by_acceptance=False)
    for i, seq in enumerate([[1, 2, 3], [1, 2, 4], [1, 2, 4]]):
        d.finish(f"r{i}", seq)
    assert d.propose("new", [9, 1, 2], 1, GREEDY).tokens == (4,)


def test_bump_keeps_sorted_and_bounded():
    rec: tuple[int, ...] = (5, 1)
    for tok in [6, 6, 7, 8, 9, 10]:
        rec = _bumped(rec, tok)
        assert len(rec) <= 8
    assert rec[:2] == (6, 2)  # most counted first
    assert rec[2] == 10  # then the most recent of the count-1 tokens
    counts = rec[1::2]
    assert list(counts) == sorted(counts, reverse=True)


def test_k_bounds():
    d = NgramDrafter(size_by_acceptance=False)
    tokens = list(range(10)) * 20
    for k in (1, 2, 3, 7, 16, 50):
        assert len(d.propose("r", tokens, k, GREEDY)) == k
    assert len(d.propose("s", [1001, 1002, 1003], 5, GREEDY)) == 0  # nothing matches
    assert d.stats()["misses"] == 1


def test_k_zero_is_empty_and_indexes_nothing():
    d = NgramDrafter(size_by_acceptance=False)
    tokens = list(range(10)) * 20
    prop = d.propose("r", tokens, 0, GREEDY)
    assert prop == Proposal()
    assert d.stats()["entries"] == 0  # k == 0 did no work at all


def test_stop_token_truncates_draft():
    d = NgramDrafter(size_by_acceptance=False)
    tokens = [1, 2, 3, 4, 5, 6, 1, 2]
    params = SamplingParams(stop_token_ids=(4,))
    assert d.propose("r", tokens, 5, params).tokens == (3, 4)


def test_memory_bound_and_evictions():
    d = NgramDrafter(max_entries=50, size_by_acceptance=False)
    rng = random.Random(1)
    for i in range(20):
        seq = [rng.randrange(1000) for _ in range(40)]
        d.start(f"r{i}", seq[:10], seq[10], EMPTY_HIDDEN)
        d.propose(f"r{i}", seq[:20], 4, GREEDY)
        assert d.stats()["entries"] <= 50
        d.finish(f"r{i}", seq)
        assert d.stats()["entries"] <= 50
    s = d.stats()
    assert s["entries"] == 50
    assert s["evictions"] > 0
    assert s["evictions"] + s["entries"] >= 20 * 30  # every fresh key was either kept or evicted


def test_lru_keeps_recently_used_ngrams():
    d = NgramDrafter(min_n=2, max_n=2, max_entries=3, size_by_acceptance=False)
    d.finish("a", [1, 2, 3])  # key (1,2)
    d.finish("b", [4, 5, 6])  # key (4,5)
    # propose indexes the request's own n-grams too ((9,1) -> 2), then touches (1,2) on the hit.
    assert d.propose("c", [9, 1, 2], 1, GREEDY).tokens == (3,)
    d.finish("d", [7, 8, 9])  # adds (7,8): evicts (4,5), the least recently used key
    assert d.stats()["entries"] == 3
    assert d.propose("e", [0, 1, 2], 1, GREEDY).tokens == (3,)  # (1,2) survived (evicts (9,1))
    assert d.propose("f", [0, 4, 5], 1, GREEDY).tokens == ()  # (4,5) was evicted


def _check_tree(prop: Proposal) -> None:
    kids: dict[int, list[int]] = {}
    for i, p in enumerate(prop.parents):
        assert -1 <= p < i
        kids.setdefault(p, []).append(prop.tokens[i])
    for sibs in kids.values():
        assert len(sibs) == len(set(sibs)), "siblings must carry distinct tokens"


def test_tree_mode_returns_valid_tree_with_distinct_siblings():
    d = NgramDrafter(min_n=1, max_n=3, tree_width=3, size_by_acceptance=False)
    # Global memory: after "1 2", 3 then 4 were seen; locally (and globally) "2" is followed by 5.
    d.finish("a", [1, 2, 3, 30, 31])
    d.finish("b", [1, 2, 4, 40, 41])
    tokens = [2, 5, 6, 0, 1, 2]
    prop = d.propose("r", tokens, 9, GREEDY)
    _check_tree(prop)
    assert len(prop) <= 9
    roots = [t for t, p in zip(prop.tokens, prop.parents) if p == -1]
    assert len(roots) >= 2 and len(set(roots)) == len(roots)
    # Longest match first (global "1 2": 4 then 3, most recent first at equal counts), then the
    # local 1-gram "2" -> 5; the best branch chains on through the global memory.
    assert roots == [4, 3, 5]
    assert prop.tokens[:3] == (4, 40, 41) and prop.parents[:3] == (-1, 0, 1)


def test_tree_mode_k_bound_and_fallback_to_chain():
    d = NgramDrafter(tree_width=4, size_by_acceptance=False)
    tokens = list(range(10)) * 5
    for k in (1, 2, 3, 5, 8, 13):
        prop = d.propose("r", tokens, k, GREEDY)
        _check_tree(prop)
        assert 1 <= len(prop) <= k
    # A single candidate gives a plain chain.
    d2 = NgramDrafter(tree_width=4, max_entries=0, size_by_acceptance=False)
    assert d2.propose("r", [1, 2, 3, 4, 1, 2], 3, GREEDY).is_chain


def test_finish_frees_state_and_observe_counts_acceptance():
    d = NgramDrafter(size_by_acceptance=False)
    tokens = _start(d, "r", [1, 2, 3, 4, 1, 2], 3)
    assert "r" in d._requests
    prop = d.propose("r", tokens, 3, GREEDY)
    assert prop.tokens == (4, 1, 2)
    result = VerifyResult(accepted_nodes=(0, 1), accepted_tokens=(4, 1), next_token=9,
                          bonus=False, proposed=3)
    d.observe(StepTrace("r", len(tokens) - 1, tokens[-1], prop, result,
                        torch.zeros(4, 3), torch.zeros(4, 1)))
    s = d.stats()
    assert s["accepted_local"] == 2 and s["proposed_local"] == 3
    assert s["active_requests"] == 1
    d.finish("r", tokens + [4, 1, 9])
    assert "r" not in d._requests and d.stats()["active_requests"] == 0
    d.finish("never-started", [1, 2, 3])  # tolerated
    d.observe(StepTrace("gone", 0, 0, prop, result, torch.zeros(4, 3), torch.zeros(4, 1)))


def test_rewritten_sequence_rebuilds_local_index():
    d = NgramDrafter(max_entries=0, size_by_acceptance=False)
    d.propose("r", [1, 2, 3, 1, 2], 1, GREEDY)
    # Same id, different history (the engine never does this, but stay correct if a caller does).
    assert d.propose("r", [7, 8, 5, 7, 8], 1, GREEDY).tokens == (5,)


def test_drafts_are_sized_by_measured_acceptance() -> None:
    """A match kind that is never accepted stops being drafted (bar rare exploration); one that
    is always accepted gets long drafts."""
    d = NgramDrafter(max_entries=0)
    seq = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2]
    d.start("r", seq[:-1], seq[-1], None)
    first = d.propose("r", seq, 8, SamplingParams())
    assert 1 <= len(first) <= 8

    def feed(accepted: int, n: int = 40) -> None:
        for _ in range(n):
            prop = d.propose("r", seq, 8, SamplingParams())
            if len(prop):
                res = VerifyResult(tuple(range(accepted)), prop.tokens[:accepted], 0, False, len(prop))
                d.observe(StepTrace("r", len(seq) - 1, seq[-1], prop, res, None, None))  # type: ignore[arg-type]

    feed(accepted=0)
    lengths = [len(d.propose("r", seq, 8, SamplingParams())) for _ in range(20)]
    assert lengths.count(0) >= 17  # nearly always skipped now
    d2 = NgramDrafter(max_entries=0)
    d2.start("r", seq[:-1], seq[-1], None)
    d = d2
    feed(accepted=5)
    assert len(d.propose("r", seq, 8, SamplingParams())) == 8
