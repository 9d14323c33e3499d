"""Where a decode step's time goes, without a profiler in the way: target-only and eagle3 engines
(the head in bfloat16 and in float32, the lookup chain on) run the same traffic prompts one after
the other, and each step's wall time is split into the target's verify forward, the drafter's
proposal and the rest (the engine's bookkeeping). cProfile (scripts/profile_decode.py) says which
functions cost; this says how far a speculative step is from one target forward.
Usage: python scripts/step_split.py --draft-weights DIR [--domain chat] [--requests 10]
[--max-tokens 64] [--threads 2] [--no-lookup] [--compare-row-ops [all|mlp]]
[--compare-bf16-weights].
``--compare-row-ops`` runs every engine twice per prompt, with and without models/row_ops.c
(norms, rotary embeddings, decode attention and the MLP's activation as C calls; "without" swaps
``row_ops.applies`` for a function that says no), in the order with, without, without, with, and
prints both splits and the number of prompts whose outputs differ anywhere (use ``--no-lookup``:
the lookup chain would draft a prompt better each time it sees it again). ``--compare-row-ops
mlp``: "without" keeps the rest of row_ops.c and swaps only its MLP calls (``silu_mul``,
``add_rms_norm``) for PyTorch's operations; their silu rounds differently, so outputs may
differ between the modes (not between engines within one)."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class Split:
    steps: int = 0
    emitted: int = 0
    decode_s: float = 0.0
    verify_s: float = 0.0
    verified_tokens: int = 0
    draft_s: float = 0.0

    def line(self, name: str) -> str:
        n = max(self.steps, 1)
        return (f"{name:16s} tau {self.emitted / n:4.2f}  {self.emitted / self.decode_s:6.1f} "
                f"tokens/s  per step: {1e3 * self.decode_s / n:5.1f} ms = verify "
                f"{1e3 * self.verify_s / n:5.1f} ({self.verified_tokens / n:.1f} tokens) + draft "
                f"{1e3 * self.draft_s / n:4.1f} + other "
                f"{1e3 * (self.decode_s - self.verify_s - self.draft_s) / n:4.1f}")


def timed(engine: Any, current: list[Split]) -> None:
    """Wrap the engine's verify and draft calls (instance attributes, this engine only); their
    time goes to ``current[0]``, the split the caller says is running."""
    verify, draft = engine.runner.verify_batch, engine._draft

    def verify_batch(items: list) -> Any:
        t0 = time.perf_counter()
        out = verify(items)
        current[0].verify_s += time.perf_counter() - t0
        current[0].verified_tokens += sum(len(it.proposal) + 1 for it in items)
        return out

    def draft_step(seqs: list) -> Any:
        t0 = time.perf_counter()
        out = draft(seqs)
        current[0].draft_s += time.perf_counter() - t0
        return out

    engine.runner.verify_batch, engine._draft = verify_batch, draft_step


def main() -> None:
    from aurora_spec.bench.traffic import resolve_traffic_dir
    from aurora_spec.cli import encode_prompt, stop_token_ids
    from aurora_spec.config import DrafterConfig, ModelConfig
    from aurora_spec.models import row_ops
    from aurora_spec.runtime import build_runtime
    from aurora_spec.types import SamplingParams

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--draft-weights", required=True)
    ap.add_argument("--domain", default="chat")
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--offset", type=int, default=0,
                    help="skip this many prompts of the domain's file first: `aurora train "
                    "--requests N` trains on its first N, so --offset N measures a head on "
                    "prompts it has not seen")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-lookup", action="store_true",
                    help="eagle3 without the n-gram lookup chain (which remembers earlier "
                    "outputs, so a prompt run twice drafts better the second time)")
    ap.add_argument("--compare-row-ops", nargs="?", const="all", choices=("all", "mlp"),
                    help="each engine with and without models/row_ops.c (all of it, or only "
                    "its MLP calls: silu_mul and add_rms_norm), interleaved")
    ap.add_argument("--compare-bf16-weights", action="store_true",
                    help="the float32 head twice: packed copies in float32 (\"eagle3 float32\")"
                    " and in bfloat16 (\"eagle3 f32 bf16w\"), whatever draft_kernels picks")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    mcfg = ModelConfig(threads=a.threads, max_slots=1)
    engines = {"target-only": build_runtime(mcfg, DrafterConfig("none"))}
    for dtype in ("bfloat16", "float32"):
        engines[f"eagle3 {dtype}"] = build_runtime(mcfg, DrafterConfig(
            "eagle3", a.draft_weights, lookup=not a.no_lookup, draft_dtype=dtype))
    if a.compare_bf16_weights:  # the float32 head's packed copies in float32 and in bfloat16
        engines["eagle3 f32 bf16w"] = build_runtime(mcfg, DrafterConfig(
            "eagle3", a.draft_weights, lookup=not a.no_lookup, draft_dtype="float32"))
        for name, bf16 in (("eagle3 float32", False), ("eagle3 f32 bf16w", True)):
            drafter: Any = engines[name].engine.drafter
            learned = getattr(drafter, "learned", drafter)  # inside the lookup hybrid
            learned.cpu_kernels, learned.bf16_weights = True, bf16
            learned.pack(learned.head)
    rt = engines["target-only"]
    with_c = (row_ops.applies, row_ops.silu_mul, row_ops.add_rms_norm)
    without_c = (_no, *with_c[1:]) if a.compare_row_ops != "mlp" else (
        with_c[0], _torch_silu_mul, _torch_add_rms_norm)
    path = Path(resolve_traffic_dir(None)) / f"{a.domain}.jsonl"
    prompts = [json.loads(line)["prompt"] for line in path.open()][a.offset:a.offset + a.requests]
    stops = stop_token_ids(rt.info, rt.tokenizer)
    params = SamplingParams(max_tokens=a.max_tokens, stop_token_ids=stops)
    ids = [encode_prompt(rt.tokenizer, p, True) for p in prompts]
    modes = ("row ops", "torch ops", "torch ops", "row ops") if a.compare_row_ops else ("",)
    splits = {(m, name): Split() for m in modes for name in engines}
    current = [Split()]
    for r in engines.values():
        r.engine.generate(ids[0], SamplingParams(max_tokens=16, stop_token_ids=stops))
        timed(r.engine, current)  # after the warm-up: it is not counted
    outputs: list[dict[str, set[tuple[int, ...]]]] = []  # per prompt: per mode, the outputs
    for x in ids:  # one prompt through every engine, then the next: host drift hits all alike
        outputs.append({m: set() for m in modes})
        for mode in modes:
            row_ops.applies, row_ops.silu_mul, row_ops.add_rms_norm = (
                without_c if mode == "torch ops" else with_c)
            for name, r in engines.items():
                current[0] = splits[(mode, name)]
                res = r.engine.generate(x, params)
                outputs[-1][mode].add(res.token_ids)
                s = current[0]
                s.steps += res.stats.verify_steps
                s.emitted += res.stats.emitted
                s.decode_s += res.stats.decode_s
    row_ops.applies, row_ops.silu_mul, row_ops.add_rms_norm = with_c
    for (mode, name), s in splits.items():
        print(s.line(f"{mode} {name}".strip()))
    engines_differ = sum(any(len(out) > 1 for out in o.values()) for o in outputs)
    print(f"{engines_differ} of {len(ids)} prompts differ in output between engines")
    if a.compare_row_ops:
        modes_differ = sum(len(set().union(*o.values())) > 1 for o in outputs)
        print(f"{modes_differ} of {len(ids)} prompts differ in output anywhere (engines or modes)")


def _no(x: torch.Tensor) -> bool:
    return False


def _torch_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def _torch_add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float,
                        offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    from aurora_spec.models import row_ops

    total = x + y
    return total, row_ops.rms_norm(total, weight, eps, offset)


if __name__ == "__main__":
    main()
