"""The drafter protocol: drafters only propose and observe; verification lives in engine.verify."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from aurora_spec.types import Proposal, SamplingParams, StepTrace


@runtime_checkable
class Drafter(Protocol):
    """Proposes draft tokens for a request and learns from what the verifier decided.

    Lifecycle per request: ``start`` once with the prompt and the first generated token, then
    alternating ``propose`` / ``observe`` (one per verify step), then ``finish``. A drafter may
    keep per-request state keyed by ``request_id``; it must free it in ``finish``.

    Optional, for drafters that add nodes costing no draft compute (drafters/hybrid.py): with
    ``free_depth = True`` the engine calls ``propose(..., k, params, limit=L)`` on every step,
    also when k = 0, where L is the most draft depth the request's budget and context allow;
    ``policy_part(request_id, result)`` then returns (depth, accepted) of the part the engine's
    draft-length policy sized (``result`` None: the depth only), and the policy learns from that;
    ``last_costly_s`` is the seconds that part took in the last ``propose``: what the policy's
    draft cost per depth is measured on (the free part's bookkeeping is paid whatever k is).
    """

    name: str

    def start(self, request_id: str, prompt_ids: list[int], first_token: int,
              prompt_hidden: torch.Tensor) -> None:
        """A request begins: the target prefilled ``prompt_ids`` and sampled ``first_token``.
        ``prompt_hidden`` is (len(prompt_ids), 3*H): the fused target layers at each prompt position."""

    def propose(self, request_id: str, tokens: list[int], k: int,
                params: SamplingParams) -> Proposal:
        """Propose up to ``k`` draft tokens continuing ``tokens`` (prompt + output so far; the last
        token is the root, not yet verified). ``k == 0`` must return an empty proposal cheaply."""

    def observe(self, trace: StepTrace) -> None:
        """The verify step for ``trace.request_id`` finished; ``trace.result`` says what was kept."""

    def finish(self, request_id: str, tokens: list[int]) -> None:
        """The request ended with the full sequence ``tokens``; free per-request state."""
