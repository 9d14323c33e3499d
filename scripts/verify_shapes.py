"""What a verify forward costs per number of tokens, on each thread count, interleaved: the shape the
draft-length policy's cost model learns (drafters/policy.py, CostModel) and how it differs between
the thread counts serving moves between while a trainer shares the cores.
Usage: python scripts/verify_shapes.py [--threads 1,2] [--sizes 1,2,3,4,5,6,7,8,10,13] [--rounds 8]"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from aurora_spec.config import ModelConfig
from aurora_spec.models.runner import CacheConfig, TargetRunner
from aurora_spec.runtime import load_target
from aurora_spec.types import Proposal


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=ints, default=[1, 2])
    ap.add_argument("--sizes", type=ints, default=[1, 2, 3, 4, 5, 6, 7, 8, 10, 13])
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    _, _, model = load_target(ModelConfig(model=args.model))
    runner = TargetRunner(model, CacheConfig(1, args.context + max(args.sizes) + 1))
    slot = runner.allocate()
    times: dict[tuple[int, int], list[float]] = {(n, t): [] for n in args.threads for t in args.sizes}
    with torch.inference_mode():
        runner.prefill(slot, [5] * args.context)
        for rnd in range(args.rounds + 1):  # round 0 warms every shape up and is discarded
            for n in args.threads:
                torch.set_num_threads(n)
                for t in args.sizes:
                    start = time.perf_counter()
                    out = runner.verify(slot, 0, Proposal.chain([7] * (t - 1)))
                    float(out.logits[0, -1, 0])
                    if rnd:
                        times[(n, t)].append(time.perf_counter() - start)
    print(f"{args.model}, context {args.context}: median ms per verify forward of T tokens "
          f"(ratio to 1 token), {args.rounds} interleaved rounds")
    for n in args.threads:
        med = {t: statistics.median(times[(n, t)]) for t in args.sizes}
        base = med[min(args.sizes)]
        print(f"  {n} thread(s): " + " ".join(f"{t}:{1e3 * m:.1f} ({m / base:.2f})"
                                             for t, m in med.items()))


if __name__ == "__main__":
    main()
