"""A test drafter that knows the right answer and lies on purpose.

It proposes the reference continuation with random corruptions, as chains or trees whose correct
branch sits at a random sibling position, so verification and cache bookkeeping are exercised on
every shape: all accepted, rejected at any depth, deep trees, empty drafts.
"""

from __future__ import annotations

import random

import torch

from aurora_spec.types import Proposal, SamplingParams, StepTrace


class ScriptedDrafter:
    name = "scripted"

    def __init__(self, reference: list[int], vocab: int, seed: int = 0, tree: bool = False,
                 corrupt: float = 0.3, empty_every: int = 0) -> None:
        self.reference = reference  # the full target-only sequence (prompt + output)
        self.vocab = vocab
        self.rng = random.Random(seed)
        self.tree = tree
        self.corrupt = corrupt
        self.empty_every = empty_every
        self.calls = 0
        self.observed = 0

    def start(self, request_id: str, prompt_ids: list[int], first_token: int,
              prompt_hidden: torch.Tensor) -> None:
        assert prompt_hidden.shape[0] == len(prompt_ids)

    def _truth(self, tokens: list[int], k: int) -> list[int]:
        n = len(tokens)
        if self.reference[:n] != tokens:
            return []  # diverged from the reference: cannot happen when lossless
        return self.reference[n:n + k]

    def _maybe_wrong(self, tok: int) -> int:
        return self.rng.randrange(self.vocab) if self.rng.random() < self.corrupt else tok

    def propose(self, request_id: str, tokens: list[int], k: int,
                params: SamplingParams) -> Proposal:
        self.calls += 1
        if k == 0 or (self.empty_every and self.calls % self.empty_every == 0):
            return Proposal()
        truth = self._truth(tokens, k) or [self.rng.randrange(self.vocab) for _ in range(k)]
        chain = [self._maybe_wrong(t) for t in truth]
        if not self.tree:
            return Proposal.chain(chain)
        # Tree: at each depth a decoy sibling (random token) placed before or after the
        # continuing node; the continuing node carries the (possibly corrupted) true token.
        toks: list[int] = []
        parents: list[int] = []
        parent = -1
        for tok in chain:
            decoy = self.rng.randrange(self.vocab)
            if self.rng.random() < 0.5:
                toks += [decoy, tok]
                parents += [parent, parent]
                parent = len(toks) - 1
            else:
                toks += [tok, decoy]
                parents += [parent, parent]
                parent = len(toks) - 2
        return Proposal(tuple(toks), tuple(parents))

    def observe(self, trace: StepTrace) -> None:
        assert trace.fused_hidden.shape[0] == len(trace.proposal) + 1
        self.observed += 1

    def finish(self, request_id: str, tokens: list[int]) -> None:
        pass
