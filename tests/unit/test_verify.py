"""verify_greedy / verify_sampling: exact cases plus statistical losslessness (chi-square).

The statistical tests emit the first two tokens of a sequence with speculation (running a second
verify step when the first emits only one token) and compare them with the target's own joint
p(x1) p(x2 | x1). Target distributions depend on the whole context, drafts do not, so a verifier
that mixes up rows or residuals shows up as a biased histogram. Seeds are fixed: deterministic.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from aurora_spec.engine import verify
from aurora_spec.engine.sampling import make_generator
from aurora_spec.engine.verify import verify_greedy, verify_sampling
from aurora_spec.types import Proposal, VerifyResult

V = 6


def rows(*argmaxes: int) -> torch.Tensor:
    """Logits (len, V) whose row r has its maximum at argmaxes[r]."""
    logits = torch.zeros(len(argmaxes), V)
    logits[torch.arange(len(argmaxes)), torch.tensor(argmaxes)] = 1.0
    return logits


# ---------------------------------------------------------------- greedy


def test_greedy_chain_all_accepted_gives_bonus():
    res = verify_greedy(Proposal.chain([3, 1, 4]), rows(3, 1, 4, 5))
    assert res.accepted_nodes == (0, 1, 2) and res.accepted_tokens == (3, 1, 4)
    assert (res.next_token, res.bonus, res.proposed) == (5, True, 3)
    assert res.emitted == (3, 1, 4, 5)


def test_greedy_first_rejected_recovers_from_root():
    res = verify_greedy(Proposal.chain([3, 1, 4]), rows(2, 1, 4, 5))
    assert res.accepted_tokens == () and (res.next_token, res.bonus) == (2, False)


def test_greedy_middle_rejection():
    res = verify_greedy(Proposal.chain([3, 1, 4]), rows(3, 1, 0, 5))
    assert res.accepted_nodes == (0, 1) and (res.next_token, res.bonus) == (0, False)


def test_greedy_tree_takes_non_first_branch():
    # root -> {0: tok 2, 1: tok 3}; 0 -> {2: tok 5}; 1 -> {3: tok 1, 4: tok 4}; 4 -> {5: tok 0}
    prop = Proposal((2, 3, 5, 1, 4, 0), (-1, -1, 0, 1, 1, 4))
    res = verify_greedy(prop, rows(3, 5, 4, 5, 1, 0, 2))
    assert res.accepted_nodes == (1, 4, 5) and res.accepted_tokens == (3, 4, 0)
    assert (res.next_token, res.bonus, res.proposed) == (2, True, 6)


def test_greedy_duplicate_siblings_take_first():
    prop = Proposal((2, 2, 1), (-1, -1, 1))  # only the second copy of token 2 has a child
    res = verify_greedy(prop, rows(2, 4, 1, 0))
    assert res.accepted_nodes == (0,) and (res.next_token, res.bonus) == (4, True)


def test_greedy_ties_follow_argmax_lowest_index():
    logits = torch.zeros(2, V)
    logits[0, [1, 3]] = 1.0  # tie between 1 and 3: the target picks 1
    assert verify_greedy(Proposal.chain([3]), logits).next_token == 1


def test_greedy_empty_proposal_is_plain_decoding():
    res = verify_greedy(Proposal(), rows(4))
    assert res == VerifyResult((), (), 4, True, 0)


# ---------------------------------------------------------------- sampling, exact cases


def test_sampling_empty_proposal_and_point_masses():
    gen = make_generator(0, "cpu")
    probs = torch.eye(V)[[2, 3, 4]]  # deterministic target: 2, then 3, then 4
    assert verify_sampling(Proposal(), probs[:1], gen).emitted == (2,)
    res = verify_sampling(Proposal.chain([2, 3]), probs, gen)
    assert res.accepted_nodes == (0, 1) and (res.next_token, res.bonus) == (4, True)
    res = verify_sampling(Proposal.chain([2, 5]), probs, gen)  # p(5) == 0: always rejected
    assert res.accepted_nodes == (0,) and (res.next_token, res.bonus, res.proposed) == (3, False, 2)


def test_sampling_never_accepts_zero_prob_token_even_when_q_is_zero():
    gen = make_generator(1, "cpu")
    probs = torch.tensor([[0.0, 0.5, 0.5, 0, 0, 0], [1.0, 0, 0, 0, 0, 0]])
    q = torch.tensor([[0.0, 1.0, 0, 0, 0, 0]])
    for _ in range(50):  # token 0 drawn although q(0) == 0 (inconsistent draft): p(0) == 0 rejects
        assert verify_sampling(Proposal.chain([0], q), probs, gen).next_token in (1, 2)
    for _ in range(50):  # q(2) == 0 < p(2): min(1, p/q) = 1 accepts
        assert verify_sampling(Proposal.chain([2], q), probs, gen).accepted_nodes == (0,)


def test_sampling_residual_fallback_when_p_equals_q():
    # p == q point mass: the residual is empty; a forced rejection must still emit a valid token.
    p = torch.eye(V)[1]
    assert verify._residual(p, 1, p).tolist() == p.tolist()
    assert verify._residual(p, 1, None).tolist() == p.tolist()


def test_sampling_reproducible_with_seed():
    probs = torch.softmax(torch.randn(4, V, generator=torch.Generator().manual_seed(0)), -1)
    prop = Proposal.chain([1, 2, 3], probs[1:].clone())
    a = [verify_sampling(prop, probs, make_generator(5, "cpu")).emitted for _ in range(3)]
    assert a[0] == a[1] == a[2]


# ---------------------------------------------------------------- statistical losslessness


class Target:
    """Context-dependent target: each context (tuple of tokens) gets its own distribution."""

    def __init__(self, seed: int) -> None:
        self.seed, self.cache = seed, {}

    def __call__(self, ctx: tuple[int, ...]) -> torch.Tensor:
        if ctx not in self.cache:
            key = sum((t + 1) * (V + 1) ** i for i, t in enumerate(ctx))
            rng = np.random.default_rng([self.seed, len(ctx), key])
            logits = rng.normal(0.0, 0.8, V)
            p = np.exp(logits)
            p[rng.integers(V)] = 0.0  # a token the target never emits here (drafts may propose it)
            self.cache[ctx] = torch.tensor(p / p.sum(), dtype=torch.float32)
        return self.cache[ctx]


def paths(prop: Proposal) -> list[tuple[int, ...]]:
    """Tokens from below the root down to each node (node included)."""
    out: list[tuple[int, ...]] = []
    for tok, par in zip(prop.tokens, prop.parents):
        out.append((out[par] if par >= 0 else ()) + (tok,))
    return out


Q1 = np.array([0.30, 0.05, 0.25, 0.0, 0.15, 0.25])  # differs from targets; q(3) == 0
Q2 = np.array([0.10, 0.35, 0.05, 0.20, 0.30, 0.0])
Q3 = np.full(V, 1 / V)
QT = torch.tensor(np.stack([Q1, Q2, Q3]), dtype=torch.float32)
SKEW = np.array([0.40, 0.05, 0.30, 0.05, 0.15, 0.05])  # point-mass drafters favour some tokens


def draws(rng: np.random.Generator, q: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Vectorised i.i.d. draws from q (rng.choice per token is far too slow for 20k steps)."""
    return np.searchsorted(np.cumsum(q), rng.random(shape) * np.sum(q), side="right")


def chain_drafter(rng: np.random.Generator, steps: int):
    """(a) chain of 3, token at depth d drawn from Q_d (stochastic draft_probs)."""
    toks = np.stack([draws(rng, q, (steps,)) for q in (Q1, Q2, Q3)], 1).tolist()
    return (Proposal.chain(t, QT) for t in toks)


def point_tree_drafter(rng: np.random.Generator, steps: int):
    """(b) 3 distinct point-mass siblings; below them 2, 1 and 0 distinct point-mass children.

    Tokens are picked without replacement with a skew, like a real drafter's top guesses.
    """
    keys = rng.random((steps, 3, V)) ** (1 / SKEW)  # Efraimidis-Spirakis weighted shuffle
    order = np.argsort(-keys, axis=-1)
    toks = np.concatenate([order[:, 0, :3], order[:, 1, :2], order[:, 2, :1]], 1).tolist()
    return (Proposal(tuple(t), (-1, -1, -1, 0, 0, 1)) for t in toks)


IID_PARENTS = (-1, -1, -1, 0, 0, 1, 1, 2, 2)
IID_Q = QT[[0, 0, 0, 1, 1, 1, 1, 1, 1]].contiguous()


def iid_tree_drafter(rng: np.random.Generator, steps: int):
    """(c) 3 i.i.d. siblings from Q1, each with 2 i.i.d. children from Q2."""
    toks = np.concatenate([draws(rng, Q1, (steps, 3)), draws(rng, Q2, (steps, 6))], 1).tolist()
    return (Proposal(tuple(t), IID_PARENTS, IID_Q) for t in toks)


def first_two(verifier, make_drafter, n: int, seed: int) -> tuple[np.ndarray, Target]:
    """Emit the first two tokens n times; returns (n, 2) tokens and the target used."""
    target, rng, gen = Target(seed), np.random.default_rng(seed), make_generator(seed, "cpu")
    drafts = make_drafter(rng, 2 * n)  # at most two verify steps per sample
    out = np.empty((n, 2), dtype=np.int64)
    for s in range(n):
        emitted: tuple[int, ...] = ()
        while len(emitted) < 2:  # a step that emits one token is followed by another step
            prop = next(drafts)
            probs = torch.stack([target(emitted)] + [target(emitted + p) for p in paths(prop)])
            emitted += verifier(prop, probs, gen).emitted
        out[s] = emitted[:2]
    return out, target


def gof_pvalue(samples: np.ndarray, expected: np.ndarray) -> float:
    """Chi-square goodness of fit; cells with < 5 expected counts are pooled into one bin."""
    observed = np.bincount(samples, minlength=len(expected)).astype(float)
    if observed[expected == 0].sum() > 0:
        return 0.0  # emitted a token the target can never produce
    exp_counts = expected * len(samples)
    big = exp_counts >= 5
    obs = np.append(observed[big], observed[~big].sum())
    exp = np.append(exp_counts[big], exp_counts[~big].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


def lossless_pvalues(verifier, make_drafter, n: int, seed: int) -> tuple[float, float]:
    out, target = first_two(verifier, make_drafter, n, seed)
    p1 = target(()).double().numpy()
    joint = np.stack([p1[x] * target((x,)).double().numpy() for x in range(V)]).ravel()
    return gof_pvalue(out[:, 0], p1), gof_pvalue(out[:, 0] * V + out[:, 1], joint)


DRAFTERS = {"chain": chain_drafter, "point_tree": point_tree_drafter, "iid_tree": iid_tree_drafter}


@pytest.mark.parametrize("name", list(DRAFTERS))
def test_sampling_is_lossless(name):
    p_first, p_pair = lossless_pvalues(verify_sampling, DRAFTERS[name], 15000, seed=11)
    assert p_first > 1e-3 and p_pair > 1e-3, (p_first, p_pair)


def accept_always(prop: Proposal, probs: torch.Tensor, gen: torch.Generator):
    """Wrong on purpose: follows first children to a leaf, then draws the bonus."""
    node, accepted = -1, []
    while (nxt := next((i for i, p in enumerate(prop.parents) if p == node), None)) is not None:
        accepted.append(nxt)
        node = nxt
    tok = int(torch.multinomial(probs[node + 1], 1, generator=gen))
    return verify._result(prop, accepted, tok, bonus=True)


def test_negative_control_accept_always_fails():
    p_first, p_pair = lossless_pvalues(accept_always, chain_drafter, 3000, seed=11)
    assert p_first < 1e-6 and p_pair < 1e-6, (p_first, p_pair)


@pytest.mark.parametrize("name", list(DRAFTERS))
def test_negative_control_missing_residual_fails(name, monkeypatch):
    # The classic bug: after a rejection keep sampling from p instead of norm(max(p - q, 0)).
    monkeypatch.setattr(verify, "_residual", lambda p, token, q: p)
    p_first, p_pair = lossless_pvalues(verify_sampling, DRAFTERS[name], 3000, seed=11)
    assert min(p_first, p_pair) < 1e-6, (p_first, p_pair)


def test_branches_are_width_chains_depth_major():
    p = Proposal.branches([5, 6, 7, 8, 9, 10], 3)  # 3 branches of depth 2
    assert p.parents == (-1, -1, -1, 0, 1, 2) and p.depths() == [1, 1, 1, 2, 2, 2]
    assert Proposal.branches([4, 5], 1) == Proposal.chain([4, 5])
    with pytest.raises(ValueError, match="do not fill 3 branches"):
        Proposal.branches([1, 2], 3)
