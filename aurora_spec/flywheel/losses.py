"""The draft head's loss (DESIGN.md section 3) and the offline acceptance measure used by the gate.

RL framing: the draft is the policy, target + verifier the environment, accepted tokens the
reward. Maximising expected acceptance is approached through forward KL(p_target || p_draft):

- accepted part: on the emitted sequence, unrolled over the draft depth as EAGLE-3's
  training-time test: at depth d >= 2 the head's input hidden is its own output of depth d-1 at
  the previous position, and it attends to what it would see at serving time (the target-built
  entries before the draft point, then its own speculative entries) -- exactly the drafter's
  cache layout (drafters/eagle3.py). Per-depth weights are configurable;
- discard part: the same KL at rejected-proposal contexts, which the verify pass already scored
  (depth 1, teacher-forced on the target's hidden state of the parent), weighted by
  ``lambda_discard``.

**Vocabulary choice.** p_target is restricted to the draft vocabulary and renormalised there:
target logits are computed only for the d2t rows of the target's lm_head (a Vd x H matmul, not
V x H), then log-softmaxed over those. The draft can never propose a token outside its vocabulary,
so mass outside it is unlearnable; renormalising keeps the KL finite and makes each position's
gradient independent of how much mass falls outside (the vocab builder, flywheel/vocab.py, keeps
that mass small and reports coverage). Full-vocabulary logits are never stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from aurora_spec.drafters.eagle3_head import Eagle3Head
from aurora_spec.flywheel.batch import Batch
from aurora_spec.models.blocks import WindowBlocks


class TargetHead:
    """The target's frozen lm_head (+ Gemma's final soft-cap), evaluated on draft-vocab rows."""

    def __init__(self, weight: torch.Tensor, softcap: float | None = None,
                 norm_scale: torch.Tensor | None = None) -> None:
        self.weight = weight.detach()
        self.softcap = softcap
        self.norm_scale = None if norm_scale is None else norm_scale.detach()  # final norm gain
        self._d2t: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None

    @staticmethod
    def from_model(model, device: torch.device | str = "cpu") -> TargetHead:
        """Frozen float32 copies of the target's lm_head, soft-cap and final norm gain."""
        norm = model.norm
        scale = (norm.weight.detach().float() + norm.offset).to(device)
        return TargetHead(model.lm_head.weight.detach().to(device, torch.float32),
                          model.spec.final_logit_softcap, scale)

    def logits(self, final: torch.Tensor, d2t: torch.Tensor,
               only: torch.Tensor | None = None) -> torch.Tensor:
        """Target logits over the draft vocabulary ``d2t``, or over its ids ``only``."""
        if self._d2t is None or self._d2t is not d2t:
            self._rows = self.weight[d2t.to(self.weight.device)].float()
            self._d2t = d2t
        rows = self._rows
        assert rows is not None  # set just above
        if only is not None:
            rows = rows[only.to(rows.device)]
        with torch.autocast(final.device.type, enabled=False):  # targets stay float32
            out = final.float() @ rows.T
        cap = self.softcap
        return torch.tanh(out / cap) * cap if cap else out


class Embedder:
    """The target's frozen token embedding (times Gemma's scale), as the drafter feeds it."""

    def __init__(self, weight: torch.Tensor, scale: float = 1.0) -> None:
        self.weight, self.scale = weight.detach(), float(scale)

    @staticmethod
    def from_model(model, device: torch.device | str = "cpu") -> Embedder:
        return Embedder(model.embed.weight.detach().to(device, torch.float32),
                        model.spec.embed_scale)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.weight[ids.to(self.weight.device)].float()
        return e * self.scale if self.scale != 1.0 else e


@dataclass
class Unrolled:
    logits: list[torch.Tensor]  # per depth, (N_d, Vd) for the committed pairs in ``pairs``
    valid: list[torch.Tensor]  # per depth, (N_d,) bool: the query exists at that depth
    logits_b: torch.Tensor  # (Nb, Vd) branch pairs, depth 1
    # per depth, the committed pairs (indices) the logits are for; None: all of them, in order
    pairs: list[torch.Tensor | None]
    # with accepted_only, per depth: whether each of those pairs' draft would be accepted (the
    # rule that chose the next depth's pairs); empty without it
    hits: list[torch.Tensor]


def _same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a[:, None] == b[None, :]


def _hits(logits: torch.Tensor, truth: torch.Tensor, width: int,
          vocab_rows: torch.Tensor | None) -> torch.Tensor:
    """Whether each row's draft would be accepted: the emitted token (draft id, -1: outside the
    vocabulary) among the top ``width`` of its logits (over the draft ids ``vocab_rows``, if
    given, which always hold the emitted tokens: losses.loss_rows)."""
    with torch.no_grad():
        top = logits.topk(min(width, logits.shape[-1]), dim=-1).indices
        ids = top if vocab_rows is None else vocab_rows[top]
        return (ids == truth[:, None]).any(-1)


def unrolled_forward(head: Eagle3Head, batch: Batch, embed: Embedder, depth: int,
                     with_branches: bool = True,
                     vocab_rows: torch.Tensor | None = None,
                     accepted_only: tuple[torch.Tensor, int] | None = None) -> Unrolled:
    """All depths of the training-time test in ``depth`` forwards of the packed batch; logits
    over the draft ids ``vocab_rows`` only, if given.

    ``accepted_only`` = (the emitted tokens as draft ids per committed pair, -1: outside the
    vocabulary; the draft's width at depth 1): depth d >= 2 runs only at the pairs whose chain
    the verifier would have accepted through depth d-1 (the emitted token among the depth-1
    top ``width``, then the greedy token at each depth after), the only places serving ever
    drafts depth d. Elsewhere a deeper query costs a forward and a backward for a draft no
    verifier sees; right after a shift that is most pairs."""
    b = batch
    nc = b.n_committed
    nb = b.n_branch if with_branches else 0
    dev = b.hidden_c.device
    hid = b.hidden_c if nb == 0 else torch.cat((b.hidden_c, b.hidden_b))
    pos = b.pos_c if nb == 0 else torch.cat((b.pos_c, b.pos_b))
    wdt = head.fc.weight.dtype
    emb_c = embed(b.tok_c).to(wdt)
    emb = emb_c if nb == 0 else torch.cat((emb_c, embed(b.tok_b).to(wdt)))
    mask = torch.zeros(nc + nb, nc + nb, dtype=torch.bool, device=dev)
    same_c = _same(b.win_c, b.win_c)
    mask[:nc, :nc] = same_c & (b.pos_c[None, :] <= b.pos_c[:, None])
    if nb:
        mask[nc:, :nc] = _same(b.win_b, b.win_c) & (b.pos_c[None, :] < b.fork_b[:, None])
        mask[nc:, nc:] = b.anc_b
    win = b.win_c if nb == 0 else torch.cat((b.win_c, b.win_b))
    cache = head.new_cache(1)
    # The rows gathered once for every depth: each gather's backward writes a dense zero-filled
    # gradient of the whole lm_head (8192 x 576), a quarter of a CPU step when done per depth.
    lm_rows = None if vocab_rows is None else head.lm_head.weight[vocab_rows]
    # Windows never see each other: attention runs window by window (models/blocks.py).
    g, logits = head(head.fuse(hid.to(wdt))[None], emb[None], pos[None], cache,
                     mask=WindowBlocks.from_mask(mask, win, win), lm_rows=lm_rows)
    out = Unrolled([logits[0, :nc]], [torch.ones(nc, dtype=torch.bool, device=dev)],
                   logits[0, nc:] if nb else logits.new_zeros(0, logits.shape[-1]), [None], [])
    has_prev = b.prev_c >= 0
    prev = b.prev_c.clamp(min=0)
    every = torch.arange(nc, device=dev)
    # sel[e]: the committed pairs depth e ran at, in order; their entries sit in ``cache`` layer
    # by layer after depth 1's, so a depth-d query at pair p sees depth 1 up to p-d+1 and the
    # depth-e entry at p-(d-e) (with accepted_only it exists: its chain was accepted that far).
    sel: dict[int, torch.Tensor] = {}
    slot = every  # each pair's row in g_prev (-1: not at that depth)
    g_prev = g[0, :nc]
    truth, width = accepted_only if accepted_only is not None else (None, 1)
    hit = None if truth is None else _hits(out.logits[0], truth, width, vocab_rows)
    if hit is not None:
        out.hits.append(hit)
    for d in range(2, depth + 1):
        if hit is None:  # every pair; a query with no chain that deep is marked invalid
            s, valid = every, out.valid[-1][prev] & has_prev
        else:
            s = (has_prev & (slot[prev] >= 0) & hit[slot[prev].clamp(min=0)]).nonzero().squeeze(1)
            if len(s) == 0:
                break
            valid = torch.ones(len(s), dtype=torch.bool, device=dev)
        sel[d] = s
        pc = b.pos_c[s]
        parts = [same_c[s] & (b.pos_c[None, :] <= pc[:, None] - d + 1)]
        if nb:  # branch pairs: depth 1 only, never seen deeper
            parts.append(torch.zeros(len(s), nb, dtype=torch.bool, device=dev))
        for e in range(2, d + 1):
            parts.append(same_c[s][:, sel[e]] & (b.pos_c[sel[e]][None, :] == pc[:, None] - (d - e)))
        blocks = WindowBlocks.from_mask(torch.cat(parts, dim=1), b.win_c[s],
                                        torch.cat([win] + [b.win_c[sel[e]] for e in range(2, d + 1)]))
        g_d, logits_d = head(g_prev[slot[prev[s]]][None], emb_c[s][None], pc[None], cache,
                             mask=blocks, lm_rows=lm_rows)
        out.logits.append(logits_d[0])
        out.valid.append(valid)
        out.pairs.append(None if hit is None else s)
        if truth is not None:
            hit = _hits(logits_d[0], truth[s], 1, vocab_rows)  # deeper: greedy, one branch
            out.hits.append(hit)
            slot = torch.full((nc,), -1, dtype=torch.long, device=dev)
            slot[s] = torch.arange(len(s), device=dev)
        g_prev = g_d[0]
    return out


def _kl(target_logits: torch.Tensor, draft_logits: torch.Tensor) -> torch.Tensor:
    """Row-wise forward KL(p_target || p_draft) over the draft vocabulary."""
    log_p = F.log_softmax(target_logits.float(), dim=-1)
    log_q = F.log_softmax(draft_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def target_top(target: TargetHead, final: torch.Tensor, d2t: torch.Tensor,
               top_k: int) -> torch.Tensor:
    """The draft ids of the target's ``top_k`` tokens at each row of ``final``, (N, top_k)."""
    logits = target.logits(final, d2t)
    return logits.topk(min(top_k, logits.shape[-1]), dim=-1).indices


def loss_rows(top: torch.Tensor, vocab: int, size: int,
              truth: torch.Tensor | None = None) -> torch.Tensor:
    """The draft ids a step's loss is computed over (sorted): every position's top target
    tokens ``top`` (N, k; -1: none) and the emitted tokens ``truth`` (draft ids, -1: outside
    the vocabulary), filled up to ``size`` with ids drawn uniformly from the rest of the
    ``vocab`` (sampled negatives, so every lm_head row is pushed down now and then). The truth
    is the top token under greedy decoding, but ids cached before a vocabulary rebuild lack
    the tokens new to it (vocab.DraftIds); emitted, they are here anyway. Why: the
    draft's lm_head over the whole draft vocabulary is ~45% of a CPU training step (forward and
    backward at every depth), while the target's top 16 of 8192 carry ~92% of its mass
    (chat/SQL/code traces of the bundled model; ``scripts/shift_catchup.py speed`` with a
    ``loss_vocab`` measures it)."""
    keep = torch.zeros(vocab, dtype=torch.bool, device=top.device)
    for ids in (top.flatten(), truth):
        if ids is not None:
            keep[ids[ids >= 0].long()] = True
    missing = size - int(keep.sum())
    if missing > 0:
        rest = (~keep).nonzero().squeeze(1)
        keep[rest[torch.randperm(len(rest), device=rest.device)[:missing]]] = True
    return keep.nonzero().squeeze(1)


@dataclass
class LossOut:
    loss: torch.Tensor
    accepted_kl: list[float]  # per depth
    discard_kl: float
    top1: list[float]  # per depth: the draft's argmax equals the emitted token


def flywheel_loss(head: Eagle3Head, batch: Batch, target: TargetHead, embed: Embedder,
                  depth: int, depth_weights: tuple[float, ...],
                  lambda_discard: float, with_top1: bool = True,
                  loss_vocab: int = 0, loss_top_k: int = 16,
                  accepted_width: int = 0) -> LossOut:
    """The weighted loss and its parts. ``with_top1``: also the draft's top-1 agreement per
    depth (for status only: an argmax over the draft vocabulary per depth, ~5% of a CPU step,
    so the trainer asks for it now and then); NaN without it. ``loss_vocab`` > 0: the KL over
    ``loss_rows`` (at least that many draft ids) instead of the whole draft vocabulary, both
    distributions renormalised there. ``accepted_width`` > 0: depths >= 2 only where serving's
    draft of that width would have been accepted so far (unrolled_forward's ``accepted_only``),
    each depth's KL the mean over those pairs."""
    with_b = lambda_discard > 0 and batch.n_branch > 0
    d2t = head.d2t
    with torch.no_grad():
        rows = None
        if 0 < loss_vocab < len(d2t):
            if batch.top_c is None or batch.top_b is None:
                final = torch.cat((batch.final_c, batch.final_b)) if with_b else batch.final_c
                top = target_top(target, final, d2t, loss_top_k)
            else:  # cached per window (Trainer._cache_target_top): no whole-vocabulary logits
                top = torch.cat((batch.top_c, batch.top_b)) if with_b else batch.top_c
            rows = loss_rows(top, len(d2t), loss_vocab, head.t2d[batch.truth_c])
        tgt_c = target.logits(batch.final_c, d2t, rows)
        tgt_b = target.logits(batch.final_b, d2t, rows) if with_b else None
        if rows is not None:
            d2t = d2t[rows]
    accepted = None
    if accepted_width > 0:
        accepted = (head.t2d[batch.truth_c], accepted_width)
    un = unrolled_forward(head, batch, embed, depth, with_branches=with_b, vocab_rows=rows,
                          accepted_only=accepted)
    weights = list(depth_weights[:depth]) + [depth_weights[-1]] * max(0, depth - len(depth_weights))
    total = un.logits[0].new_zeros(())
    wsum = 0.0
    kls, top1 = [], []
    for d, (lg, valid, at) in enumerate(zip(un.logits, un.valid, un.pairs)):
        tgt, truth = (tgt_c, batch.truth_c) if at is None else (tgt_c[at], batch.truth_c[at])
        if not bool(valid.any()):
            kls.append(float("nan"))
            top1.append(float("nan"))
            continue
        kl = _kl(tgt[valid], lg[valid]).mean()
        total = total + weights[d] * kl
        wsum += weights[d]
        kls.append(float(kl.detach()))
        if not with_top1:
            top1.append(float("nan"))
            continue
        with torch.no_grad():
            top1.append(float((d2t[lg[valid].argmax(-1)] == truth[valid]).float().mean()))
    total = total / max(wsum, 1e-9)
    kls += [float("nan")] * (depth - len(kls))  # depths no accepted chain reached
    top1 += [float("nan")] * (depth - len(top1))
    discard = float("nan")
    if with_b and tgt_b is not None and len(tgt_b):
        kl_b = _kl(tgt_b, un.logits_b).mean()
        total = total + lambda_discard * kl_b
        discard = float(kl_b.detach())
    return LossOut(total, kls, discard, top1)


@torch.no_grad()
def acceptance_lengths(head: Eagle3Head, batch: Batch, embed: Embedder,
                       depth: int, width: int = 1) -> torch.Tensor:
    """For every draft point in ``batch`` (a committed pair at depth 1), how many of a greedy
    chain of ``depth`` draft tokens the verifier would accept, judged against the tokens the
    target emitted. Teacher-forcing the emitted token at depth >= 2 is exact here: a chain only
    continues past depth d-1 when its token there equals the emitted one.

    ``width`` > 1 scores the trees serving drafts (Eagle3Drafter._tree): the top ``width``
    tokens at depth 1, each branch extended greedily. Depth 1 is accepted when the emitted token
    is among them, and only that branch can go on, from the emitted token: the chain's test
    from depth 2.

    Depth d runs only where a chain was accepted through depth d-1 (unrolled_forward's
    ``accepted_only``): a query elsewhere could not change any length, and on a weak head it is
    most of them."""
    truth = head.t2d[batch.truth_c]
    un = unrolled_forward(head, batch, embed, depth, with_branches=False,
                          accepted_only=(truth, width))
    nc = batch.n_committed
    dev = batch.prev_c.device
    # correct[d][p]: depth d+1's draft at pair p matches the emitted token (False where it
    # did not run: no chain reached p that deep)
    correct = []
    for hit, at in zip(un.hits, un.pairs):
        full = torch.zeros(nc, dtype=torch.bool, device=dev)
        full[slice(None) if at is None else at] = hit
        correct.append(full)
    nxt = torch.full((nc,), -1, dtype=torch.long, device=dev)
    has = batch.prev_c >= 0
    nxt[batch.prev_c[has]] = torch.arange(nc, device=dev)[has]
    run = correct[0].clone()
    total = run.long()
    idx = torch.arange(nc, device=dev)
    for d in range(1, len(correct)):  # depths past the last list entry: no chain got there
        idx = torch.where(idx >= 0, nxt[idx.clamp(min=0)], idx)
        run = run & (idx >= 0) & correct[d][idx.clamp(min=0)]
        total += run.long()
    return total
