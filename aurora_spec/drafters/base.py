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
