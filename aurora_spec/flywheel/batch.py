"""From step records to training windows, and from windows to one packed training batch.

A *window* is a contiguous slice of one request's committed positions s..L: rows (fused, final),
the tokens x_s..x_{L+1}, plus the rejected-branch nodes scored by the verify steps in that slice.
Its training *pairs* follow the drafter's convention (drafters/eagle3.py): the pair at position j
is (fused h_j, token x_{j+1}); the head's output there predicts x_{j+2}, whose target
distribution is lm_head(final_{j+1}). So pairs j = s..L-1 have targets. A branch pair for a
rejected node d at position q is (fused hidden of d's parent, d) at position q-1, with target
lm_head(final of d); it sees the window's pairs before its fork point and its branch ancestors.

Windows of different requests are packed into one sequence; masks keep them apart.

Prompt positions (prompt records, flywheel/traces.py) are trained on like any others, but only
pairs where serving drafts are *scored* (acceptance, the gate): pair j with j >= P - 1 for a
prompt of P tokens (serving's first draft point is the prompt's last position).
"""

from __future__ import annotations

from typing import Any

from dataclasses import dataclass, field

import torch

from aurora_spec.flywheel.traces import TraceRecord, fused_width


@dataclass
class Window:
    request_id: str
    domain: str | None
    pos0: int
    tokens: list[int]  # x_s .. x_{L+1}: len(rows) + 1
    rows: torch.Tensor  # (T, 4H) [fused | final], storage dtype
    br_tok: list[int] = field(default_factory=list)
    br_parent: list[int] = field(default_factory=list)  # >= 0: committed row; < 0: -(branch + 1)
    br_rows: torch.Tensor | None = None  # (B, 4H)
    versions: tuple[int, ...] = ()
    prompt_rows: int = 0  # the first rows are prompt positions (a prefix)
    # A cache the trainer fills (Trainer._cache_target_top): (vocabulary stamp, the target's top
    # draft ids (pairs + branches, k) for each pair's and then each branch's target), so a
    # window replayed many times pays for the whole draft vocabulary's target logits once.
    target_top: tuple[int, torch.Tensor] | None = None

    def target_rows(self) -> torch.Tensor:
        """The target's final hidden states of the pairs' targets, then of the branch nodes:
        the rows ``target_top`` holds ids for, in its order."""
        width = fused_width(self.rows)
        final = self.rows[1:self.pairs + 1, width:]
        return final if self.br_rows is None else torch.cat((final, self.br_rows[:, width:]))

    @property
    def pairs(self) -> int:
        return max(self.rows.shape[0] - 1, 0)

    @property
    def first_scored(self) -> int:
        """Index of the first pair at a position where serving drafts."""
        return max(self.prompt_rows - 1, 0)

    @property
    def scored_pairs(self) -> int:
        return max(self.pairs - self.first_scored, 0)

    @property
    def nbytes(self) -> int:
        n = self.rows.numel() * self.rows.element_size()
        if self.br_rows is not None:
            n += self.br_rows.numel() * self.br_rows.element_size()
        if self.target_top is not None:
            n += self.target_top[1].numel() * self.target_top[1].element_size()
        return n + 8 * (len(self.tokens) + 2 * len(self.br_tok)) + 200


class _Open:
    __slots__ = ("branches", "domain", "last_seen", "n", "pos0", "prompt_rows", "rid", "rows",
                 "tokens", "versions")

    def __init__(self, rid: str, domain: str | None, pos0: int, root: int) -> None:
        self.rid, self.domain, self.pos0 = rid, domain, pos0
        self.tokens = [root]
        self.rows: list[torch.Tensor] = []
        self.branches: list[tuple[int, int, torch.Tensor]] = []
        self.n = 0
        self.prompt_rows = 0
        self.last_seen = 0
        self.versions: set[int] = set()


class WindowAssembler:
    """Stitches one request's verify steps into windows of at most ``window`` pairs. A window
    closes when full (the next one starts at its last row, so no pair is lost), when its request
    skips a position (a dropped record), or when the request has been silent for ``idle`` records.
    A long prompt record is cut into pieces of ``window`` rows first."""

    def __init__(self, window: int = 128, idle: int = 64, max_open: int = 1024) -> None:
        self.window, self.idle, self.max_open = window, idle, max_open
        self._open: dict[str, _Open] = {}
        self._count = 0

    def add(self, rec: TraceRecord) -> list[Window]:
        if rec.prompt and rec.rows.shape[0] > self.window:
            out: list[Window] = []
            for a in range(0, rec.rows.shape[0], self.window):
                b = min(a + self.window, rec.rows.shape[0])
                out += self._add(TraceRecord(rec.request_id, rec.domain, rec.version, rec.pos + a,
                                             rec.tokens[a:b + 1], rec.rows[a:b], (), 0, True))
            return out
        return self._add(rec)

    def _add(self, rec: TraceRecord) -> list[Window]:
        out: list[Window] = []
        self._count += 1
        o = self._open.get(rec.request_id)
        if o is not None and (rec.pos != o.pos0 + o.n or o.tokens[-1] != rec.tokens[0]):
            out += self._close(o)
            o = None
        if o is None:
            o = _Open(rec.request_id, rec.domain, rec.pos, rec.tokens[0])
            self._open[rec.request_id] = o
        m = rec.accepted
        base_row, base_br = o.n, len(o.branches)
        o.rows.append(rec.rows[: m + 1])
        o.tokens.extend(rec.tokens[1:])
        for r, (tok, prow) in enumerate(rec.rejected):
            parent = base_row + prow if prow <= m else -(base_br + prow - m - 1) - 1
            o.branches.append((tok, parent, rec.rows[m + 1 + r]))
        o.n += m + 1
        if rec.prompt:
            o.prompt_rows = o.n
        else:
            o.versions.add(rec.version)
        o.last_seen = self._count
        if o.n > self.window or (rec.prompt and o.n >= self.window):
            out += self._close(o, carry=True)
        if self._count % 16 == 0 or len(self._open) > self.max_open:
            for stale in [x for x in self._open.values()
                          if self._count - x.last_seen > self.idle or len(self._open) > self.max_open]:
                out += self._close(stale)
        return out

    def flush(self) -> list[Window]:
        out: list[Window] = []
        for o in list(self._open.values()):
            out += self._close(o)
        return out

    def _close(self, o: _Open, carry: bool = False) -> list[Window]:
        self._open.pop(o.rid, None)
        rows = torch.cat(o.rows) if o.rows else None
        out = []
        if rows is not None and (rows.shape[0] > 1 or o.branches):
            win = Window(o.rid, o.domain, o.pos0, list(o.tokens), rows,
                         versions=tuple(sorted(o.versions)), prompt_rows=o.prompt_rows)
            if o.branches:
                win.br_tok = [b[0] for b in o.branches]
                win.br_parent = [b[1] for b in o.branches]
                win.br_rows = torch.stack([b[2] for b in o.branches])
            out.append(win)
        if carry and rows is not None:  # continue from the last row: its pair needs the next one
            nxt = _Open(o.rid, o.domain, o.pos0 + o.n - 1, o.tokens[-2])
            nxt.tokens.append(o.tokens[-1])
            nxt.rows = [rows[-1:].clone()]
            nxt.n, nxt.last_seen = 1, o.last_seen
            nxt.prompt_rows = 1 if o.prompt_rows >= o.n else 0
            self._open[o.rid] = nxt
        return out


@dataclass
class Batch:
    """Packed pairs. Committed pairs (c) feed every unroll depth; branch pairs (b) depth 1 only."""

    hidden_c: torch.Tensor  # (Nc, 3H) fused hidden of pair j
    tok_c: torch.Tensor  # (Nc,) x_{j+1}
    pos_c: torch.Tensor  # (Nc,) j
    win_c: torch.Tensor  # (Nc,) window index
    final_c: torch.Tensor  # (Nc, H) final_{j+1}: the target for the head's output at j
    truth_c: torch.Tensor  # (Nc,) x_{j+2}: the token the target emitted
    prev_c: torch.Tensor  # (Nc,) index of pair j-1 in the same window, -1 at a window start
    scored_c: torch.Tensor  # (Nc,) bool: serving drafts here (not inside a prompt)
    hidden_b: torch.Tensor  # (Nb, 3H)
    tok_b: torch.Tensor
    pos_b: torch.Tensor
    win_b: torch.Tensor
    fork_b: torch.Tensor  # (Nb,) committed pairs at positions < fork are visible
    anc_b: torch.Tensor  # (Nb, Nb) bool: column is the row's ancestor or itself
    final_b: torch.Tensor  # (Nb, H)
    # The target's top draft ids for each pair's target, (Nc, k) and (Nb, k), where every
    # window carried them (Window.target_top); None otherwise.
    top_c: torch.Tensor | None = None
    top_b: torch.Tensor | None = None

    @property
    def n_committed(self) -> int:
        return len(self.tok_c)

    @property
    def n_branch(self) -> int:
        return len(self.tok_b)

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> Batch:
        moved = {}
        for name, t in self.__dict__.items():
            if t is not None:
                t = t.to(device)
                t = t.to(dtype) if t.is_floating_point() else t
            moved[name] = t
        return Batch(**moved)


def pack_windows(windows: list[Window], with_branches: bool = True) -> Batch:
    hc, tc, pc, wc, fc, truth, prev, scored = [], [], [], [], [], [], [], []
    hb: list[torch.Tensor] = []
    tb: list[Any] = []
    pb: list[Any] = []
    wb: list[Any] = []
    kb: list[Any] = []
    fb: list[Any] = []
    parents: list[Any] = []
    tops: list[torch.Tensor] = []
    tops_b: list[torch.Tensor] = []
    nc = 0
    for w_idx, win in enumerate(windows):
        rows, t = win.rows, win.pairs
        if win.target_top is not None:
            tops.append(win.target_top[1][:t])
            if with_branches and win.br_rows is not None:  # the branches packed below
                tops_b.append(win.target_top[1][t:])
        width = fused_width(rows)
        if t > 0:
            hc.append(rows[:t, :width])
            fc.append(rows[1:t + 1, width:])
            tc.append(torch.tensor(win.tokens[1:t + 1]))
            truth.append(torch.tensor(win.tokens[2:t + 2]))
            pc.append(torch.arange(win.pos0, win.pos0 + t))
            wc.append(torch.full((t,), w_idx))
            pv = torch.arange(nc - 1, nc + t - 1)
            pv[0] = -1
            prev.append(pv)
            scored.append(torch.arange(t) >= win.first_scored)
            nc += t
        if not with_branches or win.br_rows is None:
            continue
        base = len(tb)
        br_pos: list[int] = []
        br_fork: list[int] = []
        for i, (tok, par) in enumerate(zip(win.br_tok, win.br_parent)):
            if par >= 0:
                hb.append(rows[par, :width])
                pos = win.pos0 + par
                fork = pos
                parents.append(-1)
            else:
                p = -par - 1
                hb.append(win.br_rows[p, :width])
                pos = br_pos[p] + 1
                fork = br_fork[p]
                parents.append(base + p)
            br_pos.append(pos)
            br_fork.append(fork)
            tb.append(tok)
            fb.append(win.br_rows[i, width:])
        pb += br_pos
        kb += br_fork
        wb += [w_idx] * len(br_pos)
    nb = len(tb)
    anc = torch.eye(nb, dtype=torch.bool)
    for i, p in enumerate(parents):  # parents precede children: rows are complete when read
        if p >= 0:
            anc[i] |= anc[p]
    h = windows[0].rows.shape[1] // 4 if windows else 0
    dtype = windows[0].rows.dtype if windows else torch.float32
    empty_rows = torch.empty(0, 3 * h, dtype=dtype)
    long0 = torch.empty(0, dtype=torch.long)
    with_top = bool(windows) and len(tops) == len(windows)
    return Batch(
        hidden_c=torch.cat(hc) if hc else empty_rows, tok_c=torch.cat(tc) if tc else long0,
        pos_c=torch.cat(pc) if pc else long0, win_c=torch.cat(wc) if wc else long0,
        final_c=torch.cat(fc) if fc else torch.empty(0, h, dtype=dtype),
        truth_c=torch.cat(truth) if truth else long0, prev_c=torch.cat(prev) if prev else long0,
        scored_c=torch.cat(scored) if scored else torch.empty(0, dtype=torch.bool),
        hidden_b=torch.stack(hb) if hb else empty_rows, tok_b=torch.tensor(tb, dtype=torch.long),
        pos_b=torch.tensor(pb, dtype=torch.long), win_b=torch.tensor(wb, dtype=torch.long),
        fork_b=torch.tensor(kb, dtype=torch.long), anc_b=anc,
        final_b=torch.stack(fb) if fb else torch.empty(0, h, dtype=dtype),
        top_c=torch.cat(tops).long() if with_top else None,
        top_b=torch.cat(tops_b or [tops[0][:0]]).long() if with_top else None)
