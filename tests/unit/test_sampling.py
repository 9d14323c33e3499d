"""processed_probs / sample / make_generator / greedy, and SamplingParams validation."""

from __future__ import annotations

import pytest
import torch

from aurora_spec.engine.sampling import greedy, make_generator, processed_probs, sample
from aurora_spec.types import InvalidRequestError, SamplingParams

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 3.0])  # order by prob: 5, 0, 1, 2, 3, 4


def test_plain_temperature_one_is_softmax():
    probs = processed_probs(LOGITS, SamplingParams(temperature=1.0))
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, torch.softmax(LOGITS, -1))


def test_temperature_scales_logits():
    probs = processed_probs(LOGITS.double(), SamplingParams(temperature=0.5))
    assert probs.dtype == torch.float32  # always float32, whatever the logits dtype
    torch.testing.assert_close(probs, torch.softmax(LOGITS * 2, -1))
    hot = processed_probs(LOGITS, SamplingParams(temperature=100.0))
    assert hot.max() - hot.min() < 0.05  # high temperature flattens towards uniform


def test_temperature_zero_is_argmax_point_mass():
    probs = processed_probs(LOGITS, SamplingParams(temperature=0.0))
    assert probs.tolist() == [0, 0, 0, 0, 0, 1]


def test_top_k_keeps_k_best_renormalised():
    probs = processed_probs(LOGITS, SamplingParams(temperature=1.0, top_k=2))
    expected = torch.zeros(6)
    expected[[5, 0]] = torch.softmax(LOGITS[[5, 0]], -1)
    torch.testing.assert_close(probs, expected)
    # top_k >= V means no truncation.
    full = processed_probs(LOGITS, SamplingParams(temperature=1.0, top_k=6))
    torch.testing.assert_close(full, torch.softmax(LOGITS, -1))


def test_top_p_keeps_smallest_prefix_reaching_top_p():
    base = torch.softmax(LOGITS, -1)
    head = (base[5] + base[0]).item()  # mass of the two best tokens
    probs = processed_probs(LOGITS, SamplingParams(temperature=1.0, top_p=head - 1e-3))
    assert (probs > 0).nonzero().flatten().tolist() == [0, 5]
    torch.testing.assert_close(probs[[5, 0]], base[[5, 0]] / head)
    # Just above the two-token mass the third token is needed too.
    probs = processed_probs(LOGITS, SamplingParams(temperature=1.0, top_p=head + 1e-3))
    assert (probs > 0).nonzero().flatten().tolist() == [0, 1, 5]


def test_top_p_one_keeps_everything_and_tiny_top_p_keeps_argmax():
    full = processed_probs(LOGITS, SamplingParams(temperature=1.0, top_p=1.0))
    torch.testing.assert_close(full, torch.softmax(LOGITS, -1))
    tiny = processed_probs(LOGITS, SamplingParams(temperature=1.0, top_p=1e-9))
    assert tiny.tolist() == [0, 0, 0, 0, 0, 1]


def test_top_k_then_top_p_batched():
    logits = torch.stack([LOGITS, LOGITS.flip(0)])
    probs = processed_probs(logits, SamplingParams(temperature=0.7, top_k=3, top_p=0.9))
    assert probs.shape == (2, 6)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    assert probs[1].tolist() == probs[0].flip(0).tolist()  # rows are processed independently
    assert int((probs[0] > 0).sum()) <= 3


@pytest.mark.parametrize("kwargs", [
    {"max_tokens": 0}, {"max_tokens": -3}, {"temperature": -0.1}, {"temperature": float("nan")},
    {"top_p": 0.0}, {"top_p": 1.5}, {"top_p": -0.2}, {"top_k": -1},
])
def test_invalid_params_rejected(kwargs):
    with pytest.raises(InvalidRequestError):
        SamplingParams(**kwargs)


def test_sample_shapes_and_reproducibility():
    probs = torch.softmax(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), -1)
    one = sample(probs[0], make_generator(7, "cpu"))
    assert isinstance(one, int) and 0 <= one < 8
    rows = sample(probs, make_generator(7, "cpu"))
    assert rows.shape == (4,) and rows.dtype == torch.long
    again = sample(probs, make_generator(7, "cpu"))
    assert rows.tolist() == again.tolist()
    assert sample(torch.tensor([0.0, 0.0, 1.0]), make_generator(None, "cpu")) == 2


def test_sample_matches_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    gen = make_generator(3, "cpu")
    draws = sample(probs.expand(20000, 4), gen)
    freq = torch.bincount(draws, minlength=4).float() / 20000
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)


def test_unseeded_generators_differ():
    a = torch.rand(4, generator=make_generator(None, "cpu"))
    b = torch.rand(4, generator=make_generator(None, "cpu"))
    assert not torch.equal(a, b)


def test_greedy_ties_go_to_lowest_index():
    assert int(greedy(torch.tensor([0.0, 2.0, 2.0, 1.0]))) == 1
    assert greedy(torch.tensor([[3.0, 3.0], [0.0, 1.0]])).tolist() == [0, 1]
