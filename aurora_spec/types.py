"""Small typed contracts shared between layers (engine, drafters, flywheel, server).

Vocabulary follows DESIGN.md section 1: a *proposal* is a draft (chain or tree) that one
*verify step* checks; its result is the *accepted* draft tokens plus exactly one token from the
target, *recovered* (replaces the first rejected draft) or *bonus* (every draft accepted).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class InvalidRequestError(ValueError):
    """Bad user input (sampling parameters, prompt length...). Maps to a 4xx / exit code 2."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. temperature == 0 means greedy."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k truncation
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise InvalidRequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not self.temperature >= 0:  # also rejects NaN
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequestError(f"top_k must be an integer >= 0, got {self.top_k!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Proposal:
    """Draft tokens as a tree, nodes in topological order (a parent always precedes its children).

    ``parents[i]`` is the index of node i's parent among the proposal's nodes, or -1 when node i
    hangs directly below the *root*: the last emitted token, not yet in the target's KV cache. A
    chain of k tokens has ``parents == (-1, 0, 1, ..., k-2)``.

    ``draft_probs`` is, for sampling at temperature > 0, the distribution over the target
    vocabulary each node's token was drawn from, shape (n, V). ``None`` means every node was
    chosen deterministically (the verifier then treats q as a point mass), which is always valid.
    Siblings with a stochastic q must have been drawn i.i.d. from the same q.
    """

    tokens: tuple[int, ...] = ()
    parents: tuple[int, ...] = ()
    draft_probs: torch.Tensor | None = None
    draft_version: int = 0

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents):
            raise ValueError("tokens and parents must have the same length")
        for i, p in enumerate(self.parents):
            if not -1 <= p < i:
                raise ValueError(f"node {i} has parent {p}: parents must precede children")

    @staticmethod
    def chain(tokens: list[int] | tuple[int, ...], draft_probs: torch.Tensor | None = None,
              draft_version: int = 0) -> Proposal:
        toks = tuple(int(t) for t in tokens)
        return Proposal(toks, tuple(range(-1, len(toks) - 1)), draft_probs, draft_version)

    @staticmethod
    def branches(tokens: list[int] | tuple[int, ...], width: int,
                 draft_version: int = 0) -> Proposal:
        """``width`` chains from the root, nodes depth-major: node d * width + b is branch b at
        depth d + 1, child of node (d - 1) * width + b (eagle3's top-w trees)."""
        toks = tuple(int(t) for t in tokens)
        if len(toks) % width:
            raise ValueError(f"{len(toks)} tokens do not fill {width} branches")
        parents = (-1,) * min(width, len(toks)) + tuple(range(len(toks) - width))
        return Proposal(toks, parents, None, draft_version)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def is_chain(self) -> bool:
        return self.parents == tuple(range(-1, len(self.tokens) - 1))

    def depths(self) -> list[int]:
        """Depth of each node: 1 for children of the root."""
        depth: list[int] = []
        for p in self.parents:
            depth.append(1 if p < 0 else depth[p] + 1)
        return depth


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of one verify step.

    ``accepted_nodes`` are proposal node indices along the accepted path (root to leaf order),
    ``accepted_tokens`` their tokens; ``next_token`` is the one token the target adds, recovered
    (``bonus`` False) or bonus (``bonus`` True). Every verify step emits ``accepted + 1`` tokens.
    """

    accepted_nodes: tuple[int, ...]
    accepted_tokens: tuple[int, ...]
    next_token: int
    bonus: bool
    proposed: int  # number of draft nodes proposed in this step

    @property
    def num_accepted(self) -> int:
        return len(self.accepted_tokens)

    @property
    def emitted(self) -> tuple[int, ...]:
        return self.accepted_tokens + (self.next_token,)


@dataclass(frozen=True)
class StepTrace:
    """What one verify step teaches the draft (consumed by drafters' observe() and the flywheel).

    Row 0 of the hidden-state tensors is the root (the token fed first); row i+1 is proposal node i.
    ``context_len`` is the number of tokens in the sequence before the root, so the root sits at
    position ``context_len``.
    """

    request_id: str
    context_len: int
    root_token: int
    proposal: Proposal
    result: VerifyResult
    fused_hidden: torch.Tensor  # (n+1, 3*H): concatenated low/mid/high target layer outputs
    final_hidden: torch.Tensor  # (n+1, H): final-norm output, lm_head input (for p_target)
    domain: str | None = None
    # (depth, accepted) of the part of the proposal the engine's draft-length policy sized: the
    # whole proposal, or for a drafter that adds free nodes (drafters/hybrid.py: a lookup chain
    # beside the head) what its costly part alone would have had accepted. The flywheel judges a
    # head version by it. None: not computed (traces built outside the engine).
    policy_part: tuple[int, int] | None = None


@dataclass(frozen=True)
class PrefillTrace:
    """What a prompt's forward teaches the draft: the target hidden states of every prompt
    position, computed anyway by prefill. Row j is the state after token ``prompt[j]``; the token
    that follows the last row is ``first_token`` (the first output token)."""

    request_id: str
    prompt: tuple[int, ...]
    first_token: int
    fused_hidden: torch.Tensor  # (P, 3*H)
    final_hidden: torch.Tensor  # (P, H)
    domain: str | None = None


@dataclass
class GenerationStats:
    """Per-request speculation counters (tau = tokens per verify step, DESIGN.md section 1)."""

    verify_steps: int = 0
    proposed: int = 0
    accepted: int = 0
    # Accepted tokens of the part of each draft the drafter sizes by its policy: for eagle3 with
    # the lookup chain, what the learned head alone would have had accepted (exact for greedy).
    head_accepted: int = 0
    emitted: int = 0  # tokens emitted by verify steps (excludes the prefill token)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    accepted_per_depth: list[int] = field(default_factory=list)
    proposed_per_depth: list[int] = field(default_factory=list)
    draft_versions: set[int] = field(default_factory=set)
    # Verify steps per serving thread count (torch's, when the step ran). Serving moves between
    # thread counts while an online trainer shares the cores, also in the middle of a request.
    steps_by_threads: dict[int, int] = field(default_factory=dict)
    # The draft-length policy's state when the request started and when it ended
    # (drafters/policy.py PolicySnapshot.as_dict); None without a drafter.
    policy_start: dict[str, object] | None = None
    policy_end: dict[str, object] | None = None

    @property
    def tau(self) -> float:
        return self.emitted / self.verify_steps if self.verify_steps else 1.0

    @property
    def tau_head(self) -> float:
        """tau had the head's part been the whole draft (1 + its accepted tokens per step)."""
        return 1 + self.head_accepted / self.verify_steps if self.verify_steps else 1.0

    def record(self, proposal: Proposal, result: VerifyResult, emitted: int,
               head_accepted: int) -> None:
        self.verify_steps += 1
        self.proposed += len(proposal)
        self.accepted += result.num_accepted
        self.head_accepted += head_accepted
        self.emitted += emitted
        depths = proposal.depths()
        for d in set(depths):
            while len(self.proposed_per_depth) < d:
                self.proposed_per_depth.append(0)
                self.accepted_per_depth.append(0)
            self.proposed_per_depth[d - 1] += 1
        for i in range(result.num_accepted):
            self.accepted_per_depth[i] += 1
        if len(proposal):  # an empty proposal (no drafting) was served by no draft version
            self.draft_versions.add(proposal.draft_version)


@dataclass(frozen=True)
class GenerationResult:
    token_ids: tuple[int, ...]
    finish_reason: str  # "stop" | "length" | "abort"
    stats: GenerationStats
    prompt_tokens: int

    @property
    def tokens_per_s(self) -> float:
        """Decode tokens/s: tokens emitted by verify steps over decode time (prefill excluded)."""
        return self.stats.emitted / self.stats.decode_s if self.stats.decode_s > 0 else 0.0
