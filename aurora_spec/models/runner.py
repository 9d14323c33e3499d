"""Target runner: the target model plus a preallocated KV cache with one row ("slot") per request.

New tokens are written at the end of a slot; a verify step forwards ``[root, *draft nodes]`` with a
tree mask, and ``commit`` keeps only the accepted path. Dropping rejected entries is just moving the
slot's length back (plus a small copy when a tree's accepted path is not a prefix), never a
reallocation or a concatenation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aurora_spec.models.transformer import DecoderModel, ForwardOutput, PackedRows
from aurora_spec.types import InvalidRequestError, Proposal


class CacheFullError(RuntimeError):
    """No free slot (too many concurrent requests for the configured cache)."""


@dataclass(frozen=True)
class CacheConfig:
    max_slots: int = 4
    capacity: int = 2048  # tokens per slot (prompt + output + one draft)


class KVCache:
    """Per layer, keys and values of shape (slots, kv_heads, capacity, head_dim)."""

    def __init__(self, model: DecoderModel, cfg: CacheConfig, dtype: torch.dtype,
                 device: torch.device) -> None:
        spec = model.spec
        shape = (cfg.max_slots, spec.num_kv_heads, cfg.capacity, spec.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.num_layers)]
        self.capacity = cfg.capacity
        self.lengths = [0] * cfg.max_slots
        # Views of one slot, built once: slicing 2 x layers tensors per forward adds up.
        self._slot_views = [[(k[s:s + 1], v[s:s + 1]) for k, v in zip(self.k, self.v, strict=True)]
                            for s in range(cfg.max_slots)]

    def views(self, slot: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self._slot_views[slot]

    def move(self, slot: int, src: torch.Tensor, dst_start: int) -> None:
        """Copy entries at positions ``src`` to ``dst_start, dst_start+1, ...`` in every layer."""
        n = src.numel()
        for k, v in zip(self.k, self.v, strict=True):
            k[slot, :, dst_start:dst_start + n] = k[slot, :, src]
            v[slot, :, dst_start:dst_start + n] = v[slot, :, src]


def tree_ancestors(parents: tuple[int, ...]) -> torch.Tensor:
    """Bool (n+1, n+1) matrix: row i may attend to column j (j is i itself or an ancestor).
    Index 0 is the root; proposal node i is index i+1."""
    n = len(parents)
    if parents == tuple(range(-1, n - 1)):  # a chain: plain causal mask
        return torch.ones(n + 1, n + 1, dtype=torch.bool).tril_()
    allowed = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    allowed[:, 0] = True
    for i, p in enumerate(parents):
        row = i + 1
        if p >= 0:
            allowed[row] = allowed[p + 1]
        allowed[row, row] = True
    return allowed


@dataclass(frozen=True)
class VerifyItem:
    """One request's part of a batched verify: its handle, root token and draft proposal."""

    handle: int
    root: int
    proposal: Proposal


class TargetRunner:
    """Owns the target model and its cache; every method takes and returns token ids only.

    Requests hold *handles*; the runner keeps their cache rows packed at 0..n-1 (a release moves
    the last row into the hole), so a batched forward over all running requests reads the cache
    through one slice, never a gather copy.

    ``packed_kernels`` (default): the linears read the model's packed CPU copies, if it has any,
    whose result for a row does not depend on how many rows share the call; that keeps a verify's
    logits equal to a one-token decode's. False: F.linear (runtime.target_kernels says when).
    """

    def __init__(self, model: DecoderModel, cache_cfg: CacheConfig = CacheConfig(),
                 packed_kernels: bool = True) -> None:
        self.model = model
        self.packed_kernels = packed_kernels
        self.spec = model.spec
        self.device = model.embed.weight.device
        self.dtype = model.embed.weight.dtype
        capacity = min(cache_cfg.capacity, self.spec.max_position_embeddings)
        cache_cfg = CacheConfig(cache_cfg.max_slots, capacity)
        self.cache = KVCache(model, cache_cfg, self.dtype, self.device)
        self.max_slots = cache_cfg.max_slots
        self._row: dict[int, int] = {}  # handle -> cache row
        self._next_handle = 0

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    @property
    def free_slots(self) -> int:
        return self.max_slots - len(self._row)

    def allocate(self) -> int:
        if not self.free_slots:
            raise CacheFullError("all KV cache slots are in use")
        handle, self._next_handle = self._next_handle, self._next_handle + 1
        row = len(self._row)
        self._row[handle] = row
        self.cache.lengths[row] = 0
        return handle

    def release(self, handle: int) -> None:
        row = self._row.pop(handle)
        last = len(self._row)
        if row != last:  # keep rows packed: move the last row into the hole
            moved = next(h for h, r in self._row.items() if r == last)
            n = self.cache.lengths[last]
            for k, v in zip(self.cache.k, self.cache.v, strict=True):
                k[row, :, :n] = k[last, :, :n]
                v[row, :, :n] = v[last, :, :n]
            self.cache.lengths[row] = n
            self._row[moved] = row
        self.cache.lengths[last] = 0

    def length(self, handle: int) -> int:
        return self.cache.lengths[self._row[handle]]

    def prefill(self, handle: int, tokens: list[int]) -> ForwardOutput:
        """Forward a prompt into an empty slot. Logits only for the last position."""
        n = len(tokens)
        if n == 0:
            raise InvalidRequestError("the prompt is empty")
        if n >= self.capacity:
            raise InvalidRequestError(
                f"the prompt has {n} tokens; the context window holds {self.capacity}")
        row = self._row[handle]
        causal = torch.ones(n, n, dtype=torch.bool, device=self.device).tril_()
        positions = torch.arange(n, device=self.device)
        # PyTorch's attention for a prompt's many queries (DecoderModel.forward says why).
        out = self._forward(row, tokens, positions, causal, logits_rows=slice(n - 1, n),
                            row_attention=False)
        self.cache.lengths[row] = n
        return out

    def verify(self, handle: int, root: int, proposal: Proposal) -> ForwardOutput:
        """Forward the root and the draft nodes; logits for all n+1 rows. Nothing is committed."""
        row = self._row[handle]
        length = self.cache.lengths[row]
        if length + len(proposal) + 1 > self.capacity:
            raise InvalidRequestError("the sequence outgrew the context window")
        allowed = tree_ancestors(proposal.parents).to(self.device)
        depths = torch.tensor([0, *proposal.depths()], device=self.device)
        return self._forward(row, [root, *proposal.tokens], length + depths, allowed)

    def verify_batch(self, items: list[VerifyItem]) -> list[ForwardOutput]:
        """One forward for several requests (ragged draft and cache lengths). Returns one
        ForwardOutput per item, trimmed to that item's n+1 rows."""
        if len(items) == 1:
            it = items[0]
            return [self.verify(it.handle, it.root, it.proposal)]
        rows = [self._row[it.handle] for it in items]
        if sorted(rows) != list(range(len(self._row))):  # not every live row: no single slice
            return [self.verify(it.handle, it.root, it.proposal) for it in items]
        by_row = sorted(range(len(items)), key=lambda i: rows[i])
        out = self._forward_batch([items[i] for i in by_row])
        result: list[ForwardOutput] = [out[0]] * len(items)
        for pos, i in enumerate(by_row):
            result[i] = out[pos]
        return result

    def commit(self, handle: int, accepted_nodes: tuple[int, ...]) -> None:
        """Keep the root and the accepted path of the last verify; drop everything else."""
        row = self._row[handle]
        length = self.cache.lengths[row]
        keep = len(accepted_nodes)
        if accepted_nodes != tuple(range(keep)):  # tree path that is not the prefix: compact it
            src = torch.tensor([length + 1 + i for i in accepted_nodes], device=self.device)
            self.cache.move(row, src, length + 1)
        self.cache.lengths[row] = length + 1 + keep

    @torch.inference_mode()
    def _forward(self, row: int, tokens: list[int], positions: torch.Tensor,
                 new_allowed: torch.Tensor, logits_rows: slice | None = None,
                 row_attention: bool = True) -> ForwardOutput:
        length = self.cache.lengths[row]
        t = len(tokens)
        kv_len = length + t
        mask = torch.ones(1, 1, t, kv_len, dtype=torch.bool, device=self.device)
        mask[0, 0, :, length:] = new_allowed
        sliding = None
        if self.spec.sliding_window:
            key_pos = torch.cat([torch.arange(length, device=self.device), positions])
            sliding = mask & self._near(key_pos[None], positions[None])
        ids = torch.tensor([tokens], device=self.device)
        return self.model(ids, positions[None], self.cache.views(row), slice(length, kv_len),
                          kv_len, mask, sliding, logits_rows, packed=self.packed_kernels,
                          row_attention=row_attention)

    def _near(self, key_pos: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        """Sliding-window condition (B, 1, T, S) from key (B, S) and query (B, T) positions."""
        window = self.spec.sliding_window or 0
        return (key_pos[:, None, :] > query_pos[:, :, None] - window)[:, None]

    @torch.inference_mode()
    def _forward_batch(self, items: list[VerifyItem]) -> list[ForwardOutput]:
        """Rows 0..B-1 in order, one forward over the real tokens only (PackedRows): requests
        drafting nothing cost one token, not the longest draft's width. Padded query positions
        of the attention grid attend to key 0 only (never to nothing)."""
        b = len(items)
        lens = [self.cache.lengths[r] for r in range(b)]
        sizes = [len(it.proposal) + 1 for it in items]
        t = max(sizes)
        if any(n + t > self.capacity for n in lens):
            return [self.verify(it.handle, it.root, it.proposal) for it in items]
        kv_len = max(lens) + t
        dev = self.device
        mask = torch.zeros(b, 1, t, kv_len, dtype=torch.bool)
        mask[:, :, :, 0] = True
        tokens: list[int] = []
        positions: list[torch.Tensor] = []
        rows: list[int] = []
        batch: list[int] = []
        for r, it in enumerate(items):
            n, size = lens[r], sizes[r]
            tokens += [it.root, *it.proposal.tokens]
            positions.append(n + torch.tensor([0, *it.proposal.depths()]))
            rows += range(r * t, r * t + size)
            batch += [r] * size
            mask[r, 0, :size, :n] = True
            mask[r, 0, :size, n:n + size] = tree_ancestors(it.proposal.parents)
        pos = torch.cat(positions).to(dev)
        # Cache slots: request r writes its tokens at lens[r] .. lens[r] + size - 1.
        slots = torch.cat([lens[r] + torch.arange(sizes[r]) for r in range(b)]).to(dev)
        packed = PackedRows(b, t, torch.tensor(rows, device=dev), torch.tensor(batch, device=dev),
                            slots)
        mask = mask.to(dev)
        sliding = None
        if self.spec.sliding_window:
            key_pos = torch.arange(kv_len, device=dev).repeat(b, 1)
            query_pos = torch.zeros(b * t, dtype=torch.long, device=dev)
            query_pos[packed.rows] = pos
            query_pos = query_pos.view(b, t)
            for r in range(b):
                key_pos[r, lens[r]:lens[r] + t] = query_pos[r]
            sliding = mask & self._near(key_pos, query_pos)
        views = [(k[:b], v[:b]) for k, v in zip(self.cache.k, self.cache.v, strict=True)]
        out = self.model(torch.tensor([tokens], device=dev), pos[None], views, packed, kv_len,
                         mask, sliding, packed=self.packed_kernels)
        result, start = [], 0
        for size in sizes:
            end = start + size
            result.append(ForwardOutput(out.logits[:, start:end], out.fused_hidden[:, start:end],
                                        out.final_hidden[:, start:end]))
            start = end
        return result
