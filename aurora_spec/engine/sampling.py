"""Token sampling primitives: the target's processed distribution, draws, greedy choice.

Pure functions over tensors; the only state is the explicit ``torch.Generator`` so that a request
with a seed is reproducible and requests never share randomness.
"""

from __future__ import annotations

import os

import torch

from aurora_spec.types import SamplingParams


def processed_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Target output distribution (..., V) in float32 after temperature, top-k, then top-p.

    This is the distribution that verification must reproduce, so drafts are judged against it.
    At temperature 0 it returns the one-hot of the argmax (greedy as a point mass), so callers get
    a valid distribution for any params.
    """
    logits = logits.float()
    if params.temperature == 0:
        one_hot = torch.zeros_like(logits)
        return one_hot.scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / params.temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        # Ties with the k-th logit are kept: dropping some of equal tokens would be arbitrary.
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        probs = _top_p(probs, params.top_p)
    return probs


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest prefix (by descending prob) whose mass reaches top_p, renormalised."""
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_p, dim=-1) - sorted_p
    # A token is needed iff the mass of strictly more likely tokens is still short of top_p;
    # the first (argmax) token always has mass_before == 0, so it is always kept.
    keep_sorted = mass_before < top_p
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    kept = probs * keep
    return kept / kept.sum(dim=-1, keepdim=True)


def sample(probs: torch.Tensor, generator: torch.Generator) -> int | torch.Tensor:
    """Draw one token from probs (V,) -> int, or one per row from (n, V) -> LongTensor (n,)."""
    draws = torch.multinomial(probs, 1, generator=generator)
    if probs.dim() == 1:
        return int(draws.item())
    return draws.squeeze(-1)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """Per-request generator; seed None draws a fresh seed from the OS (not torch's global RNG)."""
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1  # 63 bits: always a valid seed
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Argmax over the last dim; ties go to the lowest index (torch.argmax semantics)."""
    return logits.argmax(dim=-1)
