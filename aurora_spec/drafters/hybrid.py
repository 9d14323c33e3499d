"""LookupHybrid: the learned head's draft and an n-gram lookup chain, verified as one tree.

Why: a day-0 head proposes nothing useful, and even after hundreds of requests a head learned on
one core is right about as often as copying what followed the same words earlier (prompt
lookup). The two are right at different places -- lookup on repeated spans (code identifiers,
quoted text, loops), the head on fresh text -- so a verify step that checks both keeps the
longest accepted path of either.

Who sizes what: the engine's draft-length policy sizes the head's tree (k, priced by measured
costs and the head's own acceptance, reported through ``policy_part``); the lookup chain costs no
draft compute, so the lookup drafter sizes it from its own per-match acceptance, up to the
request's limit, and the engine asks for it on every step (``free_depth``), also when the head is
not worth drafting (a day-0 head). The policy prices the head's tree one branch wider than it is,
for the lookup chain's verified tokens.

Merging: the lookup chain is inserted into the head's tree as a trie, so a lookup token equal to
a head node at the same place reuses that node. With ``narrow`` set, a step whose lookup chain
adds nodes to the head's tree verifies only the head's first branch (its top-1 chain) beside it
(``DrafterConfig.lookup_narrow``, auto by default: set where the target's measured cost per
verified row steps up, runtime.narrow_beside_lookup). Why: where the verify cost steps up past
a few rows (AVX2: a 7-12-row forward costs ~1.3-1.7x a 2-6-row one) the head's siblings bought
~0.01 tokens a step where the chain was there, and with it took a quarter of the drafting steps
past 6 rows (scripts/hybrid_steps.py; docs/results/day0.md, "The head's siblings beside a lookup
chain"). Only deterministic drafts merge: a sampled head chain (temperature > 0, ``draft_probs``
set) is returned alone, because the verifier's rule for stochastic siblings needs every sibling
drawn from the same q.

Attribution (``stats()``): per verify step, the accepted path's longest prefix of head nodes is
what the head alone would have had accepted, and likewise for lookup nodes (exact for greedy
decoding: the same target logits, the same path). The engine and the trainer see one drafter;
the learned head still trains on every emitted token and every rejected node.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from aurora_spec.types import Proposal, SamplingParams, StepTrace


@dataclass
class _Step:
    """The sources of the proposal a request is waiting to have verified."""

    head_nodes: frozenset[int]
    head_depth: int
    lookup_nodes: tuple[int, ...]  # the lookup chain, node ids in the merged tree (root first)
    lookup: Proposal  # the lookup drafter's own proposal, as it made it
    # ``narrow``, greedy: the first tokens of the head's branches left out of the verified tree
    dropped: frozenset[int] = frozenset()


@dataclass
class SourceCounters:
    steps: int = 0  # verify steps that drafted
    accepted: int = 0  # draft tokens accepted, merged tree
    accepted_head: int = 0  # ... that the head's tree alone would have had accepted
    accepted_lookup: int = 0  # ... that the lookup chain alone would have had accepted
    lookup_steps: int = 0  # steps with a lookup chain in the tree
    lookup_nodes: int = 0  # nodes the lookup chain added (not shared with the head)
    narrowed: int = 0  # steps that verified the head's first branch only (``narrow``)
    # request id -> [steps, head-alone accepted, lookup-alone accepted] of running requests, and
    # of the last FINISHED_KEPT finished ones (read by benchmarks after a request ends).
    running: dict[str, list[int]] = field(default_factory=dict)
    finished: OrderedDict[str, list[int]] = field(default_factory=OrderedDict)


FINISHED_KEPT = 256


def merge_chain(tree: Proposal, chain: tuple[int, ...]) -> tuple[Proposal, tuple[int, ...]]:
    """``tree`` with ``chain`` (tokens below the root) inserted as a trie path; returns the merged
    proposal and the chain's node ids in it. ``tree``'s node ids are unchanged."""
    tokens, parents = list(tree.tokens), list(tree.parents)
    child = {(p, t): i for i, (p, t) in enumerate(zip(parents, tokens))}
    path: list[int] = []
    parent = -1
    for tok in chain:
        node = child.get((parent, tok))
        if node is None:
            node = len(tokens)
            tokens.append(tok)
            parents.append(parent)
            child[(parent, tok)] = node
        path.append(node)
        parent = node
    merged = Proposal(tuple(tokens), tuple(parents), tree.draft_probs, tree.draft_version)
    return merged, tuple(path)


def first_branch(tree: Proposal) -> Proposal:
    """``tree``'s first root-level node and its descendants, renumbered in the same order."""
    new: dict[int, int] = {}
    tokens: list[int] = []
    parents: list[int] = []
    for i, (tok, parent) in enumerate(zip(tree.tokens, tree.parents)):
        if (parent == -1 and not tokens) or parent in new:
            new[i] = len(tokens)
            tokens.append(tok)
            parents.append(new.get(parent, -1))
    return Proposal(tuple(tokens), tuple(parents), tree.draft_probs, tree.draft_version)


def _prefix_in(accepted: tuple[int, ...], nodes: frozenset[int] | set[int]) -> int:
    n = 0
    for node in accepted:
        if node not in nodes:
            break
        n += 1
    return n


class LookupHybrid:
    """Drafter (``drafters.base.Drafter``) over a learned drafter (``Eagle3Drafter``: ``head``,
    ``swap_head``, trees) and a lookup drafter (``NgramDrafter`` with ``tree_width=1``)."""

    name = "eagle3+lookup"
    free_depth = True  # the engine asks every step, with the request's draft limit

    def __init__(self, learned: Any, lookup: Any, narrow: bool = False) -> None:
        if getattr(lookup, "tree_width", 1) != 1:
            raise ValueError("the lookup drafter must propose chains (tree_width=1)")
        self.learned = learned
        self.lookup = lookup
        self.narrow = narrow  # a chain that adds nodes replaces the head's siblings
        # The policy prices a depth-k draft as (w + 1) * k + 1 verified tokens: the head's w
        # branches and a possible lookup chain.
        self.tree_width = int(getattr(learned, "tree_width", 1)) + 1
        # The policy models the head alone (policy_part), so it starts from the head's prior.
        self.prior_acceptance = getattr(learned, "prior_acceptance", None)
        self.counters = SourceCounters()
        self._pending: dict[str, _Step] = {}
        self.last_costly_s = 0.0  # the head's share of the last propose (the engine's cost model)

    # ---- what the flywheel and the engine read from the learned drafter ----

    @property
    def head(self) -> Any:
        return self.learned.head

    @property
    def head_width(self) -> int:
        return int(getattr(self.learned, "head_width", 1))

    def swap_head(self, head: Any) -> None:
        self.learned.swap_head(head)

    @property
    def cpu_kernels(self) -> bool:
        return bool(self.learned.cpu_kernels)

    def pack(self, head: Any) -> None:
        self.learned.pack(head)

    @property
    def last_catch_up(self) -> int:
        return int(getattr(self.learned, "last_catch_up", 0))

    def time_draft(self, prompt_hidden: Any, k: int, reps: int = 3,
                   between: Callable[[], None] | None = None) -> float:
        """The head's cost per draft depth (the lookup chain costs no draft compute)."""
        return float(self.learned.time_draft(prompt_hidden, k, reps, between))

    # ---- Drafter protocol ----

    def start(self, request_id: str, prompt_ids: list[int], first_token: int,
              prompt_hidden: Any) -> None:
        self.learned.start(request_id, prompt_ids, first_token, prompt_hidden)
        self.lookup.start(request_id, prompt_ids, first_token, prompt_hidden)
        self.counters.running[request_id] = [0, 0, 0]

    def propose(self, request_id: str, tokens: list[int], k: int, params: SamplingParams,
                limit: int | None = None) -> Proposal:
        """The head's draft of depth ``k`` (0: none) merged with a lookup chain of at most
        ``limit`` tokens (default ``k``; the engine passes the request's limit)."""
        start = time.perf_counter()
        head = self.learned.propose(request_id, tokens, k, params)
        self.last_costly_s = time.perf_counter() - start
        depth = max(head.depths(), default=0)
        limit = k if limit is None else limit
        if limit <= 0 or head.draft_probs is not None:
            self._pending[request_id] = _Step(frozenset(range(len(head))), depth, (), Proposal())
            return head
        chain = self.lookup.propose(request_id, tokens, limit, params)
        merged, path = merge_chain(head, chain.tokens)
        dropped: frozenset[int] = frozenset()
        if self.narrow and len(merged) > len(head) and not head.is_chain:
            top = first_branch(head)
            if params.greedy:
                roots = {t for t, p in zip(head.tokens, head.parents) if p == -1}
                dropped = frozenset(roots - {top.tokens[0]})
            head = top
            merged, path = merge_chain(head, chain.tokens)
            self.counters.narrowed += 1
        self._pending[request_id] = _Step(frozenset(range(len(head))), depth, path, chain,
                                          dropped)
        return merged

    def policy_part(self, request_id: str, result: Any = None) -> tuple[int, int]:
        """(depth, accepted) of the head's part of the pending proposal: what the engine's
        draft-length policy sized and learns from (``result`` None: the depth only). On a
        narrowed greedy step the head is credited with its first depth where a branch left out
        had the target's token there. Why: the policy sized the whole tree and prices it so;
        judged on its top branch alone it learnt a lower acceptance and drafted less (a static
        head's depth-1 estimate 0.25 against 0.29, tau 1.95 against 2.01)."""
        step = self._pending.get(request_id)
        if step is None:
            return 0, 0
        if result is None:
            return step.head_depth, 0
        accepted = _prefix_in(result.accepted_nodes, step.head_nodes)
        if not accepted and step.dropped:
            root = result.accepted_tokens[0] if result.accepted_tokens else result.next_token
            accepted = int(root in step.dropped)
        return step.head_depth, accepted

    def observe(self, trace: StepTrace) -> None:
        self.learned.observe(trace)
        step = self._pending.pop(trace.request_id, None)
        if step is None or not len(trace.proposal):
            return
        accepted = trace.result.accepted_nodes
        by_head = _prefix_in(accepted, step.head_nodes)
        n_lookup = _prefix_in(accepted, set(step.lookup_nodes))
        res = trace.result
        self.lookup.observe(replace(trace, proposal=step.lookup, result=replace(
            res, accepted_nodes=tuple(range(n_lookup)), accepted_tokens=res.accepted_tokens[:n_lookup],
            proposed=len(step.lookup))))
        self._count(trace.request_id, len(accepted), by_head, n_lookup, step)

    def _count(self, rid: str, accepted: int, by_head: int, by_lookup: int, step: _Step) -> None:
        c = self.counters
        c.steps += 1
        c.accepted += accepted
        c.accepted_head += by_head
        c.accepted_lookup += by_lookup
        if step.lookup_nodes:
            c.lookup_steps += 1
            c.lookup_nodes += sum(1 for n in step.lookup_nodes if n not in step.head_nodes)
        per = c.running.get(rid)
        if per is not None:
            per[0] += 1
            per[1] += by_head
            per[2] += by_lookup

    def finish(self, request_id: str, tokens: list[int]) -> None:
        self.learned.finish(request_id, tokens)
        self.lookup.finish(request_id, tokens)
        self._pending.pop(request_id, None)
        c = self.counters
        per = c.running.pop(request_id, None)
        if per is not None:
            c.finished[request_id] = per
            c.finished.move_to_end(request_id)
            if len(c.finished) > FINISHED_KEPT:
                c.finished.popitem(last=False)

    def request_counts(self, request_id: str) -> tuple[int, int, int] | None:
        """(drafting steps, head-alone accepted, lookup-alone accepted) of a running request or
        one of the last ``FINISHED_KEPT`` finished ones."""
        c = self.counters
        per = c.running.get(request_id) or c.finished.get(request_id)
        return None if per is None else (per[0], per[1], per[2])

    def stats(self) -> dict[str, int | float]:
        c = self.counters
        steps = max(c.steps, 1)
        return {"steps": c.steps, "accepted": c.accepted, "accepted_head": c.accepted_head,
                "accepted_lookup": c.accepted_lookup, "lookup_steps": c.lookup_steps,
                "lookup_nodes": c.lookup_nodes, "narrowed": c.narrowed,
                "tau": round(1 + c.accepted / steps, 4),
                "tau_head_alone": round(1 + c.accepted_head / steps, 4),
                "tau_lookup_alone": round(1 + c.accepted_lookup / steps, 4)}
