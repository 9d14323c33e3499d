"""Target runner: the target model plus a preallocated KV cache with one row ("slot") per request.

New tokens are written at the end of a slot; a verify step forwards ``[root, *draft nodes]`` with a
tree mask, and ``commit`` keeps only the accepted path. Dropping rejected entries is just moving the
slot's length back (plus a small copy when a tree's accepted path is not a prefix), never a
reallocation or a concatenation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aurora_spec.models.transformer import DecoderModel, ForwardOutput
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


class TargetRunner:
    """Owns the target model and its cache; every method takes and returns token ids only."""

    def __init__(self, model: DecoderModel, cache_cfg: CacheConfig = CacheConfig()) -> None:
        self.model = model
        self.spec = model.spec
        self.device = model.embed.weight.device
        self.dtype = model.embed.weight.dtype
        capacity = min(cache_cfg.capacity, self.spec.max_position_embeddings)
        cache_cfg = CacheConfig(cache_cfg.max_slots, capacity)
        self.cache = KVCache(model, cache_cfg, self.dtype, self.device)
        self._free = list(range(cache_cfg.max_slots - 1, -1, -1))

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise CacheFullError("all KV cache slots are in use")
        slot = self._free.pop()
        self.cache.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        self.cache.lengths[slot] = 0
        self._free.append(slot)

    def length(self, slot: int) -> int:
        return self.cache.lengths[slot]

    def prefill(self, slot: int, tokens: list[int]) -> ForwardOutput:
        """Forward a prompt into an empty slot. Logits only for the last position."""
        n = len(tokens)
        if n == 0:
            raise InvalidRequestError("the prompt is empty")
        if n >= self.capacity:
            raise InvalidRequestError(
                f"the prompt has {n} tokens; the context window holds {self.capacity}")
        causal = torch.ones(n, n, dtype=torch.bool, device=self.device).tril_()
        positions = torch.arange(n, device=self.device)
        out = self._forward(slot, tokens, positions, causal, logits_rows=slice(n - 1, n))
        self.cache.lengths[slot] = n
        return out

    def verify(self, slot: int, root: int, proposal: Proposal) -> ForwardOutput:
        """Forward the root and the draft nodes; logits for all n+1 rows. Nothing is committed."""
        length = self.cache.lengths[slot]
        if length + len(proposal) + 1 > self.capacity:
            raise InvalidRequestError("the sequence outgrew the context window")
        allowed = tree_ancestors(proposal.parents).to(self.device)
        depths = torch.tensor([0, *proposal.depths()], device=self.device)
        tokens = [root, *proposal.tokens]
        return self._forward(slot, tokens, length + depths, allowed)

    def commit(self, slot: int, accepted_nodes: tuple[int, ...]) -> None:
        """Keep the root and the accepted path of the last verify; drop everything else."""
        length = self.cache.lengths[slot]
        keep = len(accepted_nodes)
        if accepted_nodes != tuple(range(keep)):  # tree path that is not the prefix: compact it
            src = torch.tensor([length + 1 + i for i in accepted_nodes], device=self.device)
            self.cache.move(slot, src, length + 1)
        self.cache.lengths[slot] = length + 1 + keep

    @torch.inference_mode()
    def _forward(self, slot: int, tokens: list[int], positions: torch.Tensor,
                 new_allowed: torch.Tensor, logits_rows: slice | None = None) -> ForwardOutput:
        length = self.cache.lengths[slot]
        t = len(tokens)
        kv_len = length + t
        mask = torch.ones(1, 1, t, kv_len, dtype=torch.bool, device=self.device)
        mask[0, 0, :, length:] = new_allowed
        sliding = None
        if self.spec.sliding_window:
            # Key positions: committed entries sit at their index, new ones at their tree position.
            key_pos = torch.cat([torch.arange(length, device=self.device), positions])
            near = key_pos[None, :] > positions[:, None] - self.spec.sliding_window
            sliding = mask & near[None, None]
        ids = torch.tensor([tokens], device=self.device)
        return self.model(ids, positions[None], self.cache.views(slot), slice(length, kv_len),
                          kv_len, mask, sliding, logits_rows)
