"""Training-free n-gram drafter: prompt-lookup decoding plus a global, memory-bounded n-gram memory.

Two sources of drafts, both keyed by the last ``n`` tokens of the context (``max_n`` down to
``min_n``, longest match first):

* **local** (same request): where did the current suffix last occur earlier in this request's own
  tokens (prompt + output so far)? Propose what followed it (prompt-lookup decoding). Each request
  keeps an incremental index ``n-gram -> most recent position`` that is extended with the new tail
  on every call, so ``propose`` never rescans the sequence.
* **global** (across requests): every prompt and output this drafter has seen feeds a table
  ``hash(n-gram) -> next tokens with counts``, LRU-bounded to ``max_entries`` keys. It works from
  the first request on, no training needed. A draft is extended greedily by looking the index up
  again on its own output (chaining).

At each match length the local match wins over the global one; a longer match wins over a shorter
one whatever its source, because a 4-token match predicts far better than a 2-token one.

Drafts are deterministic (``draft_probs`` is None, a point-mass q), which the verifier accepts at
any temperature without changing the output distribution.

Thread safety: not thread-safe, and it needs no locks: the engine calls every method from its one
engine thread. Read ``stats()`` from that thread (or accept slightly stale numbers elsewhere).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from aurora_spec.types import Proposal, SamplingParams, StepTrace

_LOCAL = "local"
_GLOBAL = "global"
_MAX_NEXT = 4  # alternatives kept per global n-gram: enough for tree siblings, small in memory


@dataclass
class _RequestState:
    """Per-request prompt-lookup index: ``positions[n - min_n][gram] = p`` means the n-gram ended
    just before position p, so ``tokens[p]`` followed it (latest occurrence wins)."""

    positions: list[dict[tuple[int, ...], int]]
    indexed: int = 0  # tokens[:indexed] are in the index (local and global)
    last_token: int = -1  # tokens[indexed - 1], to notice a sequence that was not just extended
    last_source: str | None = None  # where the pending proposal's first token came from
    last_n: int = 0  # the match length of the pending proposal's first token
    last_len: int = 0


@dataclass
class _Counters:
    hits: dict[str, int] = field(default_factory=lambda: {_LOCAL: 0, _GLOBAL: 0})
    proposed: dict[str, int] = field(default_factory=lambda: {_LOCAL: 0, _GLOBAL: 0})
    accepted: dict[str, int] = field(default_factory=lambda: {_LOCAL: 0, _GLOBAL: 0})
    misses: int = 0
    evictions: int = 0


class NgramDrafter:
    """Drafter (see ``drafters.base.Drafter``) proposing continuations of matched n-grams.

    ``tree_width > 1`` returns up to that many root-level branches with distinct first tokens
    (different matches); the total number of nodes never exceeds ``k``.
    """

    name = "ngram"

    def __init__(self, min_n: int = 2, max_n: int = 4, max_entries: int = 1_000_000,
                 tree_width: int = 1, size_by_acceptance: bool = True) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        if max_entries < 0 or tree_width < 1:
            raise ValueError("max_entries must be >= 0 and tree_width >= 1")
        self.min_n, self.max_n = min_n, max_n
        self.max_entries, self.tree_width = max_entries, tree_width
        # hash(n-gram) -> (tok, count, tok, count, ...), sorted by count (ties: most recent first).
        # Keys are 64-bit hashes, not tuples, to save memory; a collision only costs a rejected draft.
        # Records are tuples of ints, not lists: the garbage collector stops tracking them, so a
        # million entries do not turn every full collection into a pause in the decode loop.
        self._global: OrderedDict[int, tuple[int, ...]] = OrderedDict()
        self._requests: dict[str, _RequestState] = {}
        self._c = _Counters()
        self._accepted_ema: dict[tuple[str, int], float] = {}
        self._skips: dict[tuple[str, int], int] = {}
        self.size_by_acceptance = size_by_acceptance
        self.min_expected, self.explore_every = 0.3, 10

    # ---- Drafter protocol -------------------------------------------------------------------

    def start(self, request_id: str, prompt_ids: list[int], first_token: int,
              prompt_hidden: torch.Tensor | None = None) -> None:
        st = self._new_state()
        self._requests[request_id] = st
        self._advance(st, list(prompt_ids) + [int(first_token)])

    def propose(self, request_id: str, tokens: list[int], k: int,
                params: SamplingParams) -> Proposal:
        if k <= 0:
            return Proposal()
        st = self._requests.get(request_id)
        if st is None:  # no start() call: index lazily, once
            st = self._requests[request_id] = self._new_state()
        self._advance(st, tokens)
        if self.tree_width > 1:
            branches = self._tree_branches(st, tokens, k)
        else:
            chain = self._chain(st, tokens, k)
            branches = [chain] if chain else []
        branches = [_cut_at_stop(b, params.stop_token_ids) for b in branches]
        return self._record(st, branches)

    def observe(self, trace: StepTrace) -> None:
        # The emitted tokens reach the index through the next propose()/finish() call (which sees
        # the full sequence); here we only attribute acceptance to the source that drafted.
        st = self._requests.get(trace.request_id)
        if st is None or st.last_source is None:
            return
        self._c.accepted[st.last_source] += trace.result.num_accepted
        if trace.proposal.is_chain:  # a chain: learn its worth
            self._learn((st.last_source, st.last_n), trace.result.num_accepted)
        st.last_source = None

    def finish(self, request_id: str, tokens: list[int]) -> None:
        st = self._requests.pop(request_id, None) or self._new_state()
        self._advance(st, tokens)  # the tail since the last propose joins the global memory

    # ---- metrics ---------------------------------------------------------------------------

    def stats(self) -> dict[str, int | float]:
        c = self._c
        return {
            "entries": len(self._global), "max_entries": self.max_entries,
            "evictions": c.evictions, "active_requests": len(self._requests),
            "hits_local": c.hits[_LOCAL], "hits_global": c.hits[_GLOBAL], "misses": c.misses,
            "proposed_local": c.proposed[_LOCAL], "proposed_global": c.proposed[_GLOBAL],
            "accepted_local": c.accepted[_LOCAL], "accepted_global": c.accepted[_GLOBAL],
        }

    # ---- indexing ------------------------------------------------------------------------

    def _new_state(self) -> _RequestState:
        return _RequestState([{} for _ in range(self.min_n, self.max_n + 1)])

    def _advance(self, st: _RequestState, tokens: list[int]) -> None:
        """Index the n-grams that gained a continuation since the last call (the new tail)."""
        end = len(tokens)
        start = st.indexed
        if start > end or (start and tokens[start - 1] != st.last_token):
            # Not an extension of what we indexed (the engine only appends, so this is a caller
            # reusing an id): rebuild the local index; the global one just learns it again.
            for d in st.positions:
                d.clear()
            start = 0
        lo, hi = self.min_n, self.max_n
        for p in range(max(start, lo), end):
            nxt = tokens[p]
            for n in range(lo, min(hi, p) + 1):
                gram = tuple(tokens[p - n:p])
                st.positions[n - lo][gram] = p
                self._remember(hash(gram), nxt)
        st.indexed = end
        st.last_token = tokens[-1] if tokens else -1

    def _remember(self, key: int, tok: int) -> None:
        """Count ``tok`` after the n-gram hashed to ``key``; evict least recently used keys."""
        if self.max_entries == 0:
            return
        rec = self._global.get(key)
        if rec is None:
            self._global[key] = (tok, 1)
            if len(self._global) > self.max_entries:
                self._global.popitem(last=False)
                self._c.evictions += 1
            return
        self._global[key] = _bumped(rec, tok)
        self._global.move_to_end(key)

    # ---- drafting ------------------------------------------------------------------------

    def _matches(self, st: _RequestState, tail: list[int]) -> Iterator[tuple[str, int, int | tuple[int, ...]]]:
        """Matches for the suffix of ``tail``, best first: (source, n, position or record)."""
        lo = self.min_n
        for n in range(min(self.max_n, len(tail)), lo - 1, -1):
            gram = tuple(tail[-n:])
            p = st.positions[n - lo].get(gram)
            if p is not None:
                yield _LOCAL, n, p
            key = hash(gram)
            rec = self._global.get(key)
            if rec is not None:
                self._global.move_to_end(key)  # a used n-gram is worth keeping
                yield _GLOBAL, n, rec

    def _chain(self, st: _RequestState, tokens: list[int], k: int,
               draft: list[int] | None = None) -> list[int]:
        """Extend ``draft`` (default empty) to up to ``k`` tokens by repeated lookup."""
        draft = [] if draft is None else draft
        while len(draft) < k:
            tail = tokens[-self.max_n:] + draft if draft else tokens[-self.max_n:]
            match = next(self._matches(st, tail), None)
            if match is None:
                break
            source, n, val = match
            if not draft and self.size_by_acceptance:
                k = min(k, self._worth(source, n))
                if k == 0:
                    break
            if not draft:
                st.last_source, st.last_n = source, n
            if isinstance(val, int):  # local: a position in ``tokens``
                _copy_from(tokens, draft, val, k)  # a local copy fills the rest in one go
                break
            draft.append(val[0])  # global: a (token, count, ...) record
        return draft

    # ---- how much a match is worth ------------------------------------------------------------
    # Measured on summarization traffic (SmolLM2): a 2-token match in the shared index is
    # accepted ~0.1 tokens per draft, a 4-token match in the request itself ~4. So the drafter
    # learns, per (source, match length), the mean number of tokens accepted per draft and sizes
    # its drafts by it (the engine's policy still caps the length by measured costs).

    def _expected(self, bucket: tuple[str, int]) -> float:
        source, n = bucket
        prior = (1.0 + 0.75 * (n - 2)) if source == _LOCAL else 0.5 * (n - 2)
        return self._accepted_ema.get(bucket, prior)

    def _worth(self, source: str, n: int) -> int:
        """Draft length for a match: about twice the expected accepted tokens, at least 1; zero
        (no draft) when it is almost never accepted, except every ``explore_every``-th time so
        that a bucket that improves is noticed."""
        bucket = (source, n)
        expected = self._expected(bucket)
        if expected < self.min_expected:
            self._skips[bucket] = self._skips.get(bucket, 0) + 1
            if self._skips[bucket] % self.explore_every:
                return 0
        return max(1, round(2 * expected + 1))

    def _learn(self, bucket: tuple[str, int], accepted: int) -> None:
        old = self._expected(bucket)
        self._accepted_ema[bucket] = old + 0.1 * (accepted - old)

    def _tree_branches(self, st: _RequestState, tokens: list[int], k: int) -> list[list[int]]:
        """Best chain plus alternatives with distinct first tokens, within a budget of k nodes.

        The best branch keeps most of the budget (deep tokens pay only if the shallow ones are
        accepted); alternatives mostly insure the first token, so they stay short."""
        firsts: list[tuple[str, int, int | tuple[int, ...]]] = []  # (source, first token, payload)
        seen: set[int] = set()
        for source, _, val in self._matches(st, tokens[-self.max_n:]):
            cands = [tokens[val]] if isinstance(val, int) else list(val[0::2])
            for tok in cands:
                if tok not in seen and len(firsts) < self.tree_width:
                    seen.add(tok)
                    firsts.append((source, tok, val))
        if not firsts:
            return []
        spare = k // 3
        n_alt = min(len(firsts) - 1, spare)
        alt_len = spare // n_alt if n_alt else 0
        branches = []
        for i, (source, tok, val) in enumerate(firsts[:n_alt + 1]):
            limit = k - n_alt * alt_len if i == 0 else alt_len
            if i == 0:
                st.last_source = source
            if isinstance(val, int):  # local: a position in ``tokens``
                branch: list[int] = []
                _copy_from(tokens, branch, val, limit)
            else:
                branch = self._chain(st, tokens, limit, [tok])
            branches.append(branch)
        return branches

    def _record(self, st: _RequestState, branches: list[list[int]]) -> Proposal:
        """Count the outcome and lay the branches out as a tree (one branch is a chain)."""
        branches = [b for b in branches if b]
        if not branches:
            self._c.misses += 1
            st.last_source = None
            return Proposal()
        tokens: list[int] = []
        parents: list[int] = []
        for branch in branches:
            for j, tok in enumerate(branch):
                parents.append(-1 if j == 0 else len(tokens) - 1)
                tokens.append(tok)
        if st.last_source is not None:
            self._c.hits[st.last_source] += 1
            self._c.proposed[st.last_source] += len(tokens)
        return Proposal(tuple(tokens), tuple(parents))


def _copy_from(tokens: list[int], draft: list[int], p: int, k: int) -> None:
    """Append ``(tokens + draft)[p:]`` to ``draft`` until it holds k tokens (p: a match's next token).

    Reading past the end of ``tokens`` reads the draft itself (LZ77-style overlap), which repeats
    the period ``len(tokens) - p``: the natural guess for loops and runs."""
    n_real = len(tokens)
    i = p
    while len(draft) < k:
        draft.append(tokens[i] if i < n_real else draft[i - n_real])
        i += 1


def _bumped(rec: tuple[int, ...], tok: int) -> tuple[int, ...]:
    """``rec`` (flat (tok, count, ...), sorted by count, ties most recent first) with one more
    count of ``tok``, keeping at most ``_MAX_NEXT`` alternatives (the least counted drops out)."""
    if rec[0] == tok:  # the usual case for repeated text (system prompts): it stays on top
        return (tok, rec[1] + 1) + rec[2:]
    count = 1
    rest: list[tuple[int, int]] = []
    for t, c in zip(rec[0::2], rec[1::2]):
        if t == tok:
            count = c + 1
        else:
            rest.append((t, c))
    at = next((i for i, (_, c) in enumerate(rest) if c <= count), len(rest))
    rest.insert(at, (tok, count))
    return tuple(x for pair in rest[:_MAX_NEXT] for x in pair)


def _cut_at_stop(branch: list[int], stop_ids: tuple[int, ...]) -> list[int]:
    """Drafting past a stop token only wastes verify compute: the request ends there."""
    for j, tok in enumerate(branch):
        if tok in stop_ids:
            return branch[:j + 1]
    return branch
