"""Compact trace records and the bounded buffer between serving and the trainer.

A ``TraceRecord`` keeps, per verify step, only what training needs (DESIGN.md section 3):

- ``pos``: the root's position; ``tokens``: root, accepted draft tokens, then the target's token
  (recovered or bonus), so the committed positions are ``pos .. pos + accepted``;
- ``rows``: one row per committed position, then one per kept rejected-branch node, each
  ``[fused (3H) | final (H)]`` in the storage dtype, on the CPU. Full-vocabulary logits are never
  stored: p_target is recomputed from ``final`` through the target's lm_head;
- ``rejected``: (token, parent_row) of kept rejected nodes; ``parent_row`` indexes ``rows``
  (a committed row or an earlier rejected row). Nodes nearest the root are kept first;
- the outcome (``proposed``, accepted) and the draft version, for live acceptance by version;
  ``head``: (depth, accepted) of the head's own part of the proposal (``StepTrace.policy_part``;
  with a lookup chain beside the head, what the head alone would have had accepted), from which
  a resting trainer tells that the traffic shifted.

A *prompt record* (``prompt=True``, from ``record_prefill``) has the same layout for a prompt's
positions: tokens = the prompt's tokens then the first output token, one row per prompt position,
nothing proposed. The assembler stitches it to the request's verify steps like any step.

The engine thread appends records; ``TraceBuffer`` is bounded in bytes, drops the oldest record
when full (counted) and never blocks. ``pack``/``unpack`` turn a batch of records into plain
bytes + small tuples for another process (no shared-memory handles that a killed trainer could
leak).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from aurora_spec.types import PrefillTrace, StepTrace

RECORD_OVERHEAD = 160  # bytes of Python objects per record, counted against the bound


def fused_width(rows: torch.Tensor) -> int:
    """Columns of the three fused layers in recorded rows laid out [fused (3H) | final (H)];
    the rest are the final layer's."""
    return rows.shape[1] * 3 // 4


@dataclass(slots=True)
class TraceRecord:
    request_id: str
    domain: str | None
    version: int
    pos: int
    tokens: tuple[int, ...]
    rows: torch.Tensor
    rejected: tuple[tuple[int, int], ...]
    proposed: int
    prompt: bool = False  # prompt positions (prefill), not a verify step
    head: tuple[int, int] = (0, 0)  # (depth, accepted) of the head's own part of the proposal

    @property
    def accepted(self) -> int:
        return len(self.tokens) - 2

    @property
    def nbytes(self) -> int:
        return self.rows.numel() * self.rows.element_size() + RECORD_OVERHEAD + 8 * len(self.tokens)

    def fused(self) -> torch.Tensor:
        return self.rows[:, :fused_width(self.rows)]

    def final(self) -> torch.Tensor:
        return self.rows[:, fused_width(self.rows):]


def record_step(trace: StepTrace, dtype: torch.dtype = torch.bfloat16,
                max_rejected: int = 8) -> TraceRecord:
    """Copy what training needs out of one verify step (the trace's tensors are views of the
    forward output and are reused by the next step)."""
    prop, res = trace.proposal, trace.result
    on_path = set(res.accepted_nodes)
    rows = [0] + [i + 1 for i in res.accepted_nodes]
    row_of = {-1: 0}
    for j, node in enumerate(res.accepted_nodes):
        row_of[node] = j + 1
    rejected: list[tuple[int, int]] = []
    if max_rejected > 0 and len(prop) > len(on_path):
        # Topological order means parents come first; keep nodes whose parent is kept, nearest
        # the root first (a chain: the first rejected node, then its descendants).
        depths = prop.depths()
        order = sorted(range(len(prop)), key=lambda i: (depths[i], i))
        for i in order:
            if len(rejected) >= max_rejected:
                break
            parent = prop.parents[i]
            if i in on_path or parent not in row_of:
                continue
            rejected.append((prop.tokens[i], row_of[parent]))
            row_of[i] = len(rows)
            rows.append(i + 1)
    fused, final = trace.fused_hidden, trace.final_hidden
    n = len(rows)
    if rows == list(range(n)):  # chain prefix: slices, no gather
        cat = torch.cat((fused[:n], final[:n]), dim=-1)
    else:
        idx = torch.tensor(rows, device=fused.device)
        cat = torch.cat((fused[idx], final[idx]), dim=-1)
    cat = cat.to(device="cpu", dtype=dtype, copy=True)
    head = trace.policy_part or (len(prop), res.num_accepted)
    return TraceRecord(trace.request_id, trace.domain, prop.draft_version, trace.context_len,
                       (trace.root_token, *res.accepted_tokens, res.next_token), cat,
                       tuple(rejected), len(prop), head=(int(head[0]), int(head[1])))


def record_prefill(trace: PrefillTrace, dtype: torch.dtype = torch.bfloat16,
                   max_rows: int = 512, version: int = 0) -> TraceRecord:
    """Copy the last ``max_rows`` prompt positions of a prefill (a long prompt's start adds
    little that its end does not, and its rows would crowd the buffer)."""
    n = len(trace.prompt)
    start = max(0, n - max_rows)
    cat = torch.cat((trace.fused_hidden[start:], trace.final_hidden[start:]), dim=-1)
    cat = cat.to(device="cpu", dtype=dtype, copy=True)
    return TraceRecord(trace.request_id, trace.domain, version, start,
                       (*trace.prompt[start:], trace.first_token), cat, (), 0, prompt=True)


class TraceBuffer:
    """Bounded in bytes; the engine thread appends, a consumer drains. Never blocks for long:
    one short lock, no waiting on the consumer."""

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes <= 0:
            raise ValueError("capacity_bytes must be positive")
        self.capacity = capacity_bytes
        self._q: deque[TraceRecord] = deque()
        self._lock = threading.Lock()
        self.bytes = 0
        self.appended = 0
        self.dropped = 0

    def append(self, rec: TraceRecord) -> None:
        size = rec.nbytes
        with self._lock:
            self._q.append(rec)
            self.bytes += size
            self.appended += 1
            while self.bytes > self.capacity and len(self._q) > 1:
                old = self._q.popleft()
                self.bytes -= old.nbytes
                self.dropped += 1
            if self.bytes > self.capacity:  # a single record larger than the whole buffer
                self._q.popleft()
                self.bytes = 0
                self.dropped += 1

    def drain(self, max_bytes: int | None = None) -> list[TraceRecord]:
        """Remove and return the oldest records, up to ``max_bytes`` (at least one record)."""
        out: list[TraceRecord] = []
        with self._lock:
            taken = 0
            while self._q and (max_bytes is None or not out or taken + self._q[0].nbytes <= max_bytes):
                rec = self._q.popleft()
                taken += rec.nbytes
                out.append(rec)
            self.bytes -= taken
        return out

    def clear(self) -> None:
        with self._lock:
            self._q.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._q)

    @property
    def fill(self) -> float:
        return self.bytes / self.capacity


# ---- transport between processes -----------------------------------------------------------

_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def pack(records: list[TraceRecord]) -> dict:
    """Records -> {"meta": [...], "rows": bytes, "dtype": str, "width": int} (picklable, no
    tensors: one contiguous byte string for all hidden rows)."""
    if not records:
        return {"meta": [], "rows": b"", "dtype": "float32", "width": 0}
    rows = torch.cat([r.rows for r in records])
    dtype = rows.dtype
    meta = [(r.request_id, r.domain, r.version, r.pos, r.tokens, r.rejected, r.proposed,
             r.rows.shape[0], r.prompt, r.head) for r in records]
    raw = rows.contiguous().view(_VIEW[dtype]).numpy().tobytes()
    return {"meta": meta, "rows": raw, "dtype": _NAMES[dtype], "width": rows.shape[1]}


def unpack(payload: dict) -> list[TraceRecord]:
    if not payload["meta"]:
        return []
    dtype = {v: k for k, v in _NAMES.items()}[payload["dtype"]]
    arr = np.frombuffer(payload["rows"], dtype=np.int16 if _VIEW[dtype] == torch.int16
                        else np.int32).copy()
    rows = torch.from_numpy(arr).view(dtype).view(-1, payload["width"])
    out, start = [], 0
    for rid, domain, version, pos, tokens, rejected, proposed, n, prompt, head in payload["meta"]:
        out.append(TraceRecord(rid, domain, version, pos, tuple(tokens), rows[start:start + n],
                               tuple(tuple(x) for x in rejected), proposed, prompt, (head[0], head[1])))
        start += n
    return out
