"""Where a decode step's time goes, without a profiler in the way: target-only and eagle3 engines
(the head in bfloat16 and in float32, the lookup chain on) run the same traffic prompts one after
the other, and each step's wall time is split into the target's verify forward, the drafter's
proposal and the rest (the engine's bookkeeping). cProfile (scripts/profile_decode.py) says which
functions cost; this says how far a speculative step is from one target forward.
Usage: python scripts/step_split.py --draft-weights DIR [--domain chat] [--requests 10]
[--max-tokens 64] [--threads 2]."""

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
        return (f"{name:14s} tau {self.emitted / n:4.2f}  {self.emitted / self.decode_s:6.1f} "
                f"tokens/s  per step: {1e3 * self.decode_s / n:5.1f} ms = verify "
                f"{1e3 * self.verify_s / n:5.1f} ({self.verified_tokens / n:.1f} tokens) + draft "
                f"{1e3 * self.draft_s / n:4.1f} + other "
                f"{1e3 * (self.decode_s - self.verify_s - self.draft_s) / n:4.1f}")


def timed(engine: Any, split: Split) -> None:
    """Wrap the engine's verify and draft calls (instance attributes, this engine only)."""
    verify, draft = engine.runner.verify_batch, engine._draft

    def verify_batch(items: list) -> Any:
        t0 = time.perf_counter()
        out = verify(items)
        split.verify_s += time.perf_counter() - t0
        split.verified_tokens += sum(len(it.proposal) + 1 for it in items)
        return out

    def draft_step(seqs: list) -> Any:
        t0 = time.perf_counter()
        out = draft(seqs)
        split.draft_s += time.perf_counter() - t0
        return out

    engine.runner.verify_batch, engine._draft = verify_batch, draft_step


def main() -> None:
    from aurora_spec.bench.traffic import resolve_traffic_dir
    from aurora_spec.cli import encode_prompt, stop_token_ids
    from aurora_spec.config import DrafterConfig, ModelConfig
    from aurora_spec.runtime import build_runtime
    from aurora_spec.types import SamplingParams

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--draft-weights", required=True)
    ap.add_argument("--domain", default="chat")
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    mcfg = ModelConfig(threads=a.threads, max_slots=1)
    engines = {"target-only": build_runtime(mcfg, DrafterConfig("none"))}
    for dtype in ("bfloat16", "float32"):
        engines[f"eagle3 {dtype}"] = build_runtime(mcfg, DrafterConfig(
            "eagle3", a.draft_weights, lookup=True, draft_dtype=dtype))
    rt = engines["target-only"]
    path = Path(resolve_traffic_dir(None)) / f"{a.domain}.jsonl"
    prompts = [json.loads(line)["prompt"] for line in path.open()][:a.requests]
    stops = stop_token_ids(rt.info, rt.tokenizer)
    params = SamplingParams(max_tokens=a.max_tokens, stop_token_ids=stops)
    ids = [encode_prompt(rt.tokenizer, p, True) for p in prompts]
    splits = {name: Split() for name in engines}
    for name, r in engines.items():
        r.engine.generate(ids[0], SamplingParams(max_tokens=16, stop_token_ids=stops))
        timed(r.engine, splits[name])  # after the warm-up: it is not counted
    for x in ids:  # one prompt through every engine, then the next: host drift hits all alike
        for name, r in engines.items():
            res = r.engine.generate(x, params)
            s = splits[name]
            s.steps += res.stats.verify_steps
            s.emitted += res.stats.emitted
            s.decode_s += res.stats.decode_s
    for name, s in splits.items():
        print(s.line(name))


if __name__ == "__main__":
    main()
