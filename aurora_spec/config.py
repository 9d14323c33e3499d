"""Frozen configuration sections. The CLI builds them from flags; nothing here is global state."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DRAFTERS = ("none", "ngram", "eagle3")


@dataclass(frozen=True)
class ModelConfig:
    model: str = "smollm2-135m"  # bundled short name, .gguf path or Hugging Face directory
    dtype: str = "float32"
    device: str = "auto"  # auto = cuda when present, else cpu
    threads: int | None = None  # torch intra-op threads (None = all cores)
    max_context: int = 2048  # KV cache tokens per request
    max_slots: int = 4  # requests held in the KV cache at once

    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@dataclass(frozen=True)
class DrafterConfig:
    name: str = "ngram"  # none | ngram | eagle3
    draft_weights: str | None = None  # eagle3: directory with head.safetensors + head.json
    draft_vocab: int = 8192  # eagle3 day-0 draft vocabulary size
    tree_width: int | None = None  # > 1 proposes trees; None: the drafter's default
    seed: int = 0  # eagle3 random initialisation
    # eagle3 head precision. auto: bfloat16 on a CPU with bf16 kernels (a draft token then costs
    # 2.05 ms against 3.07 ms in float32 on one thread, scripts/draft_cost.py), else the target's
    # dtype. Drafts only propose, so their precision never changes the output.
    draft_dtype: str = "auto"
    # eagle3: also verify an n-gram lookup chain (prompt lookup + the n-gram memory of past
    # traffic) merged into the head's tree (drafters/hybrid.py). It pays from the first request,
    # when a day-0 head is still useless, and later where the head is wrong on repeated spans.
    lookup: bool = True
    # eagle3 + lookup: on a step whose lookup chain adds nodes, verify only the head's first
    # branch beside it, not its siblings (drafters/hybrid.py, ``narrow``). None (auto): where
    # the target's linears cost clearly more for 9 rows than for 5 (runtime.narrow_beside_lookup):
    # on an AVX2-only host it served 3-5% more tokens/s at a tau 0.03-0.06 lower (docs/results/
    # day0.md, "The head's siblings beside a lookup chain").
    lookup_narrow: bool | None = None
