"""The draft vocabulary, chosen from the token frequencies of the traffic seen so far.

The draft head's lm_head covers ``draft_vocab_size`` target tokens (d2t). Coverage, the share of
recently emitted tokens inside the draft vocabulary, is the reported metric: a token outside can
never be drafted. When coverage falls below a threshold (new traffic, a domain shift) and a
rebuilt vocabulary would cover clearly more, the builder proposes a new d2t: the most frequent
tokens by a score that weighs all traffic so far and the recent window equally (the recent window
adapts to shifts, the all-time counts keep what other domains need). ``Eagle3Head.set_vocab``
keeps the lm_head rows of tokens in both vocabularies, and ``DraftIds`` carries draft ids
cached under an older vocabulary over to the new one.
"""

from __future__ import annotations

from collections import deque

import torch

from aurora_spec.drafters.eagle3_head import target_to_draft


class VocabBuilder:
    def __init__(self, target_vocab: int, draft_vocab: int, threshold: float = 0.97,
                 min_tokens: int = 256, window: int = 4096, min_gain: float = 0.005) -> None:
        self.target_vocab, self.draft_vocab = target_vocab, draft_vocab
        self.threshold, self.min_tokens, self.min_gain = threshold, min_tokens, min_gain
        self.counts = torch.zeros(target_vocab, dtype=torch.float64)
        self.recent: deque[int] = deque(maxlen=window)
        self.seen = 0
        self.since_rebuild = 0
        self.built_at = 0  # ``seen`` when the vocabulary was last rebuilt
        self.rebuilds = 0

    def observe(self, tokens: list[int] | tuple[int, ...], emitted: bool = True) -> None:
        """Count tokens; ``emitted=False`` (prompt tokens) counts them for the vocabulary's
        choice only, not for coverage (which is measured on emitted tokens)."""
        ids = [t for t in tokens if 0 <= t < self.target_vocab]
        if not ids:
            return
        self.counts.index_add_(0, torch.tensor(ids), torch.ones(len(ids), dtype=torch.float64))
        if not emitted:
            return
        self.recent.extend(ids)
        self.seen += len(ids)
        self.since_rebuild += len(ids)

    def coverage(self, t2d: torch.Tensor, newest: int | None = None) -> float:
        """Share of the recent emitted tokens (only the ``newest`` of them, if given) that are in
        the vocabulary ``t2d`` maps."""
        recent = list(self.recent)
        if newest is not None:
            recent = recent[len(recent) - min(max(newest, 0), len(recent)):]
        if not recent:
            return 1.0
        ids = torch.tensor(recent)
        return float((t2d.cpu()[ids] >= 0).double().mean())

    def coverage_since_build(self, t2d: torch.Tensor) -> float:
        """Coverage of the tokens emitted since the last rebuild (the newest window of them; NaN
        before any). Out of sample, unlike ``coverage``: right after a rebuild that one is
        measured on the very tokens the vocabulary was chosen from (~1.0), where this one reads
        what drafting will meet (~0.9 on mixed chat, code and math: scripts/coverage_drift.py)."""
        since = self.seen - self.built_at
        return self.coverage(t2d, newest=since) if since > 0 else float("nan")

    def build(self, current: torch.Tensor | None = None) -> torch.Tensor:
        """The ``draft_vocab`` highest-scoring tokens. Ties (above all the tokens the traffic has
        not shown yet, at 0): first those in the ``current`` vocabulary (a target-to-draft map,
        -1 outside), then lower ids (the BPE merge order). Why the current ones first: a head
        trained before serving knows its vocabulary's rows; a rebuild after the first few
        requests would otherwise swap ~1100 of them for low ids nobody has seen either."""
        score = self.counts / max(self.counts.sum().item(), 1.0)
        if self.recent:
            recent = torch.zeros_like(self.counts)
            recent.index_add_(0, torch.tensor(list(self.recent)),
                              torch.ones(len(self.recent), dtype=torch.float64))
            score = score + recent / len(self.recent)
        kept = torch.zeros(self.target_vocab, dtype=torch.int8)
        if current is not None:
            kept = (current.cpu() >= 0).to(torch.int8)
        # lexicographic (score, kept, -id): stable sorts from the last key to the first
        order = torch.sort(kept, descending=True, stable=True).indices  # ids ascending within
        order = order[torch.sort(score[order], descending=True, stable=True).indices]
        return torch.sort(order[:self.draft_vocab]).values

    def maybe_rebuild(self, t2d: torch.Tensor) -> torch.Tensor | None:
        """A new d2t when coverage is below the threshold and rebuilding clearly helps."""
        if self.since_rebuild < self.min_tokens or self.draft_vocab >= self.target_vocab:
            return None
        now = self.coverage(t2d)
        if now >= self.threshold:
            return None
        d2t = self.build(t2d)
        new_t2d = target_to_draft(d2t, self.target_vocab)
        self.since_rebuild = 0
        if self.coverage(new_t2d) < now + self.min_gain:
            return None
        self.rebuilds += 1
        self.built_at = self.seen
        return d2t


class DraftIds:
    """Draft ids across vocabulary rebuilds. ``stamp`` counts the rebuilds; ids cached under an
    older stamp are mapped to today's vocabulary through the rebuilds since (a token the rebuild
    dropped becomes -1), so a window's cached top target ids (Window.target_top) survive a
    rebuild instead of being recomputed: the vocabulary is rebuilt ~14 times in a 300-request
    day-0 run, and replayed windows mostly come from the reservoir, sampled once between two
    rebuilds at most. What carried ids would lack: tokens new to the vocabulary that rank among
    a position's top ones. So a window that emitted a token which entered the vocabulary after
    its ids were cached is recomputed; elsewhere the emitted token is the top one under greedy
    decoding, and the loss rows always hold it (losses.loss_rows). On a day-0 proxy run
    (scripts/shift_catchup.py fit) ids were computed for 235 windows, 469 when every rebuild
    invalidated them. Only the newest ``keep`` rebuilds are kept (each an int32 map over the
    draft vocabulary); ids older than that are recomputed. ``follow`` reads the vocabulary off
    the head in use, so whatever changed it (a rebuild, a rollback to an older version) counts."""

    def __init__(self, target_vocab: int, keep: int = 64) -> None:
        self.stamp = 0
        self._d2t: torch.Tensor | None = None  # the vocabulary ``follow`` saw last
        self._maps: deque[torch.Tensor] = deque(maxlen=keep)  # the newest last
        self._entered = torch.zeros(target_vocab, dtype=torch.int32)  # stamp a token came in

    def follow(self, d2t: torch.Tensor) -> int:
        """The stamp of vocabulary ``d2t``: one rebuild more when it differs from the one seen
        last."""
        d2t = d2t.cpu()
        if self._d2t is None or not torch.equal(d2t, self._d2t):
            if self._d2t is not None:
                self.rebuilt(self._d2t, d2t)
            self._d2t = d2t.clone()
        return self.stamp

    def rebuilt(self, old_d2t: torch.Tensor, new_d2t: torch.Tensor) -> None:
        """Record one rebuild: old draft id i is the new draft id of target token old_d2t[i]."""
        old_d2t, new_d2t = old_d2t.cpu(), new_d2t.cpu()
        self.stamp += 1
        self._entered[new_d2t[~torch.isin(new_d2t, old_d2t)]] = self.stamp
        new_t2d = target_to_draft(new_d2t, len(self._entered))
        self._maps.append(new_t2d[old_d2t].to(torch.int32))

    def carry(self, stamp: int, ids: torch.Tensor, tokens: list[int]) -> torch.Tensor | None:
        """``ids`` (draft ids under ``stamp``, -1 for none) of a window that emitted ``tokens``,
        in today's vocabulary; None: recompute them (a token of the window entered the
        vocabulary since, or the rebuilds since are no longer kept)."""
        back = self.stamp - stamp
        if back < 0 or back > len(self._maps):
            return None
        if back and int(self._entered[torch.tensor(tokens)].max()) > stamp:
            return None
        for m in list(self._maps)[len(self._maps) - back:]:
            ids = torch.where(ids >= 0, m[ids.clamp(min=0).long()], -1).to(torch.int32)
        return ids
