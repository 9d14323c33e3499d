"""The loss and the gate's measure unrolled on accepted chains only (TrainerConfig.unroll_accepted,
losses.acceptance_lengths): each checked against a slow reference built from the full unroll."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from aurora_spec.flywheel.batch import pack_windows
from aurora_spec.flywheel.losses import (
    Embedder,
    TargetHead,
    acceptance_lengths,
    flywheel_loss,
    unrolled_forward,
)
from tests.flywheel_helpers import assemble, run_engine
from tests.tiny_models import head_for, tiny_target


def _accepted_chains(full, prev: torch.Tensor, truth: torch.Tensor, width: int):
    """The slow reference of unrolled_forward's ``accepted_only``: from the full unroll's
    logits, the pairs each depth >= 2 must run at (a chain accepted through the depth before)."""
    sel = [torch.ones(len(truth), dtype=torch.bool)]
    hit = (full.logits[0].topk(width, dim=-1).indices == truth[:, None]).any(-1)
    for lg in full.logits[1:]:
        at = (prev >= 0) & sel[-1][prev.clamp(min=0)] & hit[prev.clamp(min=0)]
        sel.append(at)
        hit = at & (lg.argmax(-1) == truth)
    return sel


@pytest.mark.parametrize("width", [1, 3])
def test_unrolling_only_accepted_chains_gives_the_full_unrolls_logits_there(width):
    """Depths >= 2 run only where serving's draft would have been accepted so far: at exactly
    those pairs (checked against a reference built from the full unroll), with the full
    unroll's logits there (their chains see the same keys)."""
    model, _ = tiny_target("llama", seed=2)
    head = head_for(model, seed=3)
    _, records, _, _ = run_engine(model, head, [7, 8, 9, 10], max_tokens=50)
    batch = pack_windows(assemble(records, window=16))
    embed = Embedder(model.embed.weight)
    with torch.no_grad():
        full = unrolled_forward(head, batch, embed, 3)
    # Emitted tokens (draft ids) that make some chains accepted through depth 2: pair q = 0
    # mod 3 gets its depth-1 guess, q = 1 its depth-2 guess, q = 2 a token never guessed.
    nc = batch.n_committed
    q = torch.arange(nc)
    truth = torch.where(q % 3 == 0, full.logits[0].argmax(-1), full.logits[1].argmax(-1))
    truth = torch.where(q % 3 == 2, torch.full_like(truth, -1), truth)
    with torch.no_grad():
        part = unrolled_forward(head, batch, embed, 3, accepted_only=(truth, width))
    want = _accepted_chains(full, batch.prev_c, truth, width)
    assert part.pairs[0] is None and len(part.logits) == 3
    for d in (1, 2):
        at = part.pairs[d]
        assert at is not None and torch.equal(at, want[d].nonzero().squeeze(1))
        assert 0 < len(at) < nc and bool(full.valid[d][at].all())
        torch.testing.assert_close(part.logits[d], full.logits[d][at], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(part.logits[0], full.logits[0])


def test_a_loss_unrolled_on_accepted_chains_trains_depth_one_alone_when_nothing_is_accepted():
    """No emitted token in the draft's guesses: no deeper query runs, the loss is the depth-1
    KL (plus the discard part), and it still backpropagates."""
    model, _ = tiny_target("llama", seed=1)
    head = head_for(model, seed=4)
    _, records, _, _ = run_engine(model, head, [3, 4, 5], max_tokens=40)
    batch = pack_windows(assemble(records, window=32))
    target, embed = TargetHead(model.lm_head.weight), Embedder(model.embed.weight)
    outside = dataclasses.replace(batch, truth_c=torch.full_like(batch.truth_c, -1))
    head.t2d[-1] = -1  # token id -1 indexes the last row: keep it outside the vocabulary too
    part = flywheel_loss(head, outside, target, embed, 3, (1.0, 0.8, 0.64), 0.0,
                         accepted_width=3)
    only1 = flywheel_loss(head, outside, target, embed, 1, (1.0,), 0.0)
    torch.testing.assert_close(part.loss, only1.loss)
    assert len(part.accepted_kl) == 3 and all(k != k for k in part.accepted_kl[1:])
    part.loss.backward()
    assert head.fc.weight.grad is not None and bool(head.fc.weight.grad.abs().sum() > 0)


def _lengths_from_full_unroll(head, batch, embed, depth: int, width: int) -> torch.Tensor:
    """The slow reference of acceptance_lengths: every depth at every pair, then each chain
    walked along its successors."""
    full = unrolled_forward(head, batch, embed, depth, with_branches=False)
    d2t, truth = head.d2t, batch.truth_c
    correct = [(d2t[lg.argmax(-1)] == truth) & v for lg, v in zip(full.logits, full.valid)]
    correct[0] = (d2t[full.logits[0].topk(width, dim=-1).indices] == truth[:, None]).any(-1)
    nxt = {int(p): i for i, p in enumerate(batch.prev_c.tolist()) if p >= 0}
    lengths = []
    for i in range(batch.n_committed):
        n, at = 0, i
        while n < depth and at is not None and bool(correct[n][at]):
            n, at = n + 1, nxt.get(at)
        lengths.append(n)
    return torch.tensor(lengths)


@pytest.mark.parametrize("width", [1, 3])
def test_acceptance_lengths_unrolling_accepted_chains_equal_the_full_unrolls(width):
    """The gate's measure runs a depth only where a chain got that far; every length equals
    the full unroll's, on emitted tokens that make chains of every length 0..depth."""
    model, _ = tiny_target("llama", seed=2)
    head = head_for(model, seed=3).eval()
    _, records, _, _ = run_engine(model, head, [7, 8, 9, 10], max_tokens=50)
    batch = pack_windows(assemble(records, window=16), with_branches=False)
    embed = Embedder(model.embed.weight)
    depth = 3
    with torch.no_grad():
        full = unrolled_forward(head, batch, embed, depth, with_branches=False)
    # each pair emits, drawn at random, its depth-1, -2 or -3 guess, the token its depth-1
    # draft ranks second (accepted by a tree, not by a chain) or the one it ranks last: chains
    # stop wherever a draw misses their depth
    q = torch.arange(batch.n_committed)
    guess = [lg.argmax(-1) for lg in full.logits]
    guess += [full.logits[0].topk(2, dim=-1).indices[:, 1], full.logits[0].argmin(-1)]
    draw = torch.randint(0, 5, (len(q),), generator=torch.Generator().manual_seed(0))
    pick = torch.stack(guess)[draw, q]
    batch = dataclasses.replace(batch, truth_c=head.d2t[pick])
    want = _lengths_from_full_unroll(head, batch, embed, depth, width)
    got = acceptance_lengths(head, batch, embed, depth, width)
    assert set(want.tolist()) == {0, 1, 2, 3}, want.tolist()
    assert torch.equal(got, want)
