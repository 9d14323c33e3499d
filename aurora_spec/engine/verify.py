"""Verification: the one place that decides which draft tokens are accepted.

Both verifiers take target rows laid out as row 0 = the root (the last emitted token, fed first),
row i + 1 = proposal node i, and walk the proposal tree from the root. Each emits the accepted path
plus exactly one target token: *recovered* if the walk stopped at a rejection, *bonus* if it
reached a leaf (an empty proposal is a bonus-only step, i.e. plain decoding).
"""

from __future__ import annotations

import torch

from aurora_spec.engine.sampling import sample
from aurora_spec.types import Proposal, VerifyResult


def _children(parents: tuple[int, ...]) -> list[list[int]]:
    """children[p + 1] lists the nodes below p (p = -1 is the root), in proposal order."""
    kids: list[list[int]] = [[] for _ in range(len(parents) + 1)]
    for i, p in enumerate(parents):
        kids[p + 1].append(i)
    return kids


def verify_greedy(proposal: Proposal, logits: torch.Tensor) -> VerifyResult:
    """Accept the longest path along which every draft equals the target's argmax.

    logits: (n + 1, V). One argmax call for all rows, then a Python walk over <= n nodes.
    """
    best = logits.argmax(dim=-1).tolist()
    kids = _children(proposal.parents)
    tokens = proposal.tokens
    accepted: list[int] = []
    node = -1
    while True:
        target = best[node + 1]
        if not kids[node + 1]:
            return _result(proposal, accepted, target, bonus=True)
        # First matching child wins: duplicates below one parent carry the same token anyway.
        nxt = next((c for c in kids[node + 1] if tokens[c] == target), None)
        if nxt is None:
            return _result(proposal, accepted, target, bonus=False)
        accepted.append(nxt)
        node = nxt


def verify_sampling(proposal: Proposal, probs: torch.Tensor,
                    generator: torch.Generator) -> VerifyResult:
    """Lossless speculative sampling over a chain or tree (Leviathan/Chen 2023, SpecInfer).

    probs: (n + 1, V) target distributions from ``processed_probs``. At each node the children are
    tried in order; child c with draft dist q is accepted w.p. min(1, p(x)/q(x)). A rejection
    replaces p by the residual norm(max(p - q, 0)) before the next sibling is tried, which keeps
    the output exactly p when siblings are distinct point masses or i.i.d. draws from one q.
    """
    n = len(proposal)
    if n == 0:
        return _result(proposal, [], sample(probs[0], generator), bonus=True)
    tokens, parents, q_all = proposal.tokens, proposal.parents, proposal.draft_probs
    # Gather p(x) under each node's parent and q(x) for all nodes with one sync (torch.take on flat
    # indices): on the common path (first child accepted) nothing else waits on the device.
    vocab = probs.shape[-1]
    p_idx = [(par + 1) * vocab + t for par, t in zip(parents, tokens)]
    gathered = torch.take(probs, torch.tensor(p_idx, device=probs.device))
    if q_all is not None:
        q_idx = torch.tensor([i * vocab + t for i, t in enumerate(tokens)], device=q_all.device)
        gathered = torch.cat((gathered, torch.take(q_all, q_idx).to(gathered)))
    vals: list[float] = gathered.tolist()
    p_tok, q_tok = vals[:n], (vals[n:] if q_all is not None else [1.0] * n)
    u = torch.rand(n, generator=generator, device=generator.device).tolist()
    kids = _children(parents)
    accepted: list[int] = []
    node = -1
    while True:
        p = probs[node + 1]
        if not kids[node + 1]:
            return _result(proposal, accepted, sample(p, generator), bonus=True)
        nxt = None
        for j, c in enumerate(kids[node + 1]):
            x = tokens[c]
            px = p_tok[c] if j == 0 else float(p[x])  # p is a residual after the first sibling
            # u * q < p  <=>  u < p/q: accepts w.p. min(1, p/q); q == 0 < p accepts, p == 0 never.
            if u[c] * q_tok[c] < px:
                nxt = c
                break
            p = _residual(p, x, None if q_all is None else q_all[c])
        if nxt is None:
            return _result(proposal, accepted, sample(p, generator), bonus=False)
        accepted.append(nxt)
        node = nxt


def _residual(p: torch.Tensor, token: int, q: torch.Tensor | None) -> torch.Tensor:
    """norm(max(p - q, 0)); q None is a point mass at token. Falls back to p if nothing is left.

    The residual is empty only when p <= q everywhere (p == q, so a rejection had probability 0
    and happened by rounding); keeping p is then the least-wrong choice.
    """
    if q is None:
        r = p.clone()
        r[token] = 0.0
    else:
        r = (p - q.to(device=p.device, dtype=p.dtype)).clamp_min_(0.0)
    total = float(r.sum())
    if not total > 0.0:
        return p
    return r / total


def _result(proposal: Proposal, accepted: list[int], next_token: int | torch.Tensor,
            bonus: bool) -> VerifyResult:
    """``next_token``: an int, or a one-element tensor (``sample`` of a (V,) row gives an int)."""
    return VerifyResult(
        accepted_nodes=tuple(accepted),
        accepted_tokens=tuple(proposal.tokens[i] for i in accepted),
        next_token=int(next_token),
        bonus=bonus,
        proposed=len(proposal),
    )
