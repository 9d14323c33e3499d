"""Candidates from a moving average of the trained weights (TrainerConfig.candidate_ema)."""

from __future__ import annotations

import pytest
import torch

from aurora_spec.flywheel.config import TrainerConfig
from tests.flywheel_helpers import trained_trainer


def test_average_trails_the_trained_weights_by_the_decay():
    _, head, trainer = trained_trainer(candidate_ema=0.9)
    before = [a.clone() for a in trainer.average.avg]
    assert trainer.train_step() is not None
    for a0, a1, p in zip(before, trainer.average.avg, trainer.head.parameters(), strict=True):
        assert torch.allclose(a1, 0.9 * a0 + 0.1 * p.detach(), atol=1e-6)
    cand = trainer.frozen_candidate()
    assert all(torch.equal(c, a) for c, a in zip(cand.parameters(), trainer.average.avg,
                                                 strict=True))
    assert not torch.equal(cand.lm_head.weight, trainer.head.lm_head.weight)  # it does trail
    assert not any(p.requires_grad for p in cand.parameters())
    # the trainer's own weights are untouched by making a candidate
    assert trainer.head.lm_head.weight.requires_grad


def test_without_an_average_a_candidate_is_the_trained_weights():
    _, _, trainer = trained_trainer()
    assert trainer.average is None
    cand = trainer.frozen_candidate()
    assert all(torch.equal(c, p) for c, p in zip(cand.parameters(), trainer.head.parameters(),
                                                 strict=True))


def test_vocab_rebuild_moves_averaged_rows_with_their_tokens():
    _, _, trainer = trained_trainer(candidate_ema=0.9)
    i = next(j for j, p in enumerate(trainer.head.parameters()) if p is trainer.head.lm_head.weight)
    avg_before = trainer.average.avg[i].clone()
    d2t_old = trainer.head.d2t.clone()
    d2t = torch.cat([d2t_old[8:], torch.arange(80, 88)])  # drop 8 tokens, add 8 new ones
    trainer.vocab.maybe_rebuild = lambda t2d: torch.sort(d2t).values
    assert trainer.maybe_rebuild_vocab()
    new_w = trainer.head.lm_head.weight
    for row, tok in enumerate(trainer.head.d2t.tolist()):
        old = (d2t_old == tok).nonzero()
        want = avg_before[old[0, 0]] if len(old) else new_w[row].detach()
        assert torch.equal(trainer.average.avg[i][row], want), tok
    trainer.vocab.maybe_rebuild = lambda t2d: None
    assert trainer.train_step() is not None
    assert trainer.frozen_candidate().lm_head.weight.shape == new_w.shape


def test_a_restart_starts_the_average_over():
    _, head, trainer = trained_trainer(candidate_ema=0.9)
    trainer.restart_from(head)
    assert all(torch.equal(a, p.detach()) for a, p in zip(trainer.average.avg,
                                                          trainer.head.parameters(), strict=True))


@pytest.mark.parametrize("decay", [-0.1, 1.0, 1.5])
def test_bad_decay_is_refused(decay):
    with pytest.raises(ValueError, match="candidate_ema"):
        TrainerConfig(candidate_ema=decay)
