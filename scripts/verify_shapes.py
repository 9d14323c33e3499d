"""What a verify forward costs per number of tokens, on each thread count, interleaved: the shape the
draft-length policy's cost model learns (drafters/policy.py, CostModel) and how it differs between
the thread counts serving moves between while a trainer shares the cores.
Usage: python scripts/verify_shapes.py [--threads 1,2] [--sizes 1,2,3,4,5,6,7,8,10,13] [--rounds 8]
[--baseline-row-ops FILE]. ``--baseline-row-ops`` also times another version of
models/row_ops.c in the same rounds (before/after a change to it), e.g.
``git show HEAD~1:aurora_spec/models/row_ops.c > /tmp/old.c``; its bits may differ."""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from aurora_spec.config import ModelConfig
from aurora_spec.models import row_ops
from aurora_spec.models.runner import CacheConfig, TargetRunner
from aurora_spec.runtime import load_target
from aurora_spec.types import Proposal


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


@contextlib.contextmanager
def row_ops_from(lib: Any) -> Iterator[None]:
    """Every row_ops call inside runs on ``lib`` (a build of another row_ops.c)."""
    default = row_ops.library
    row_ops.library = lambda: lib  # type: ignore[assignment]
    try:
        yield
    finally:
        row_ops.library = default  # type: ignore[assignment]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=ints, default=[1, 2])
    ap.add_argument("--sizes", type=ints, default=[1, 2, 3, 4, 5, 6, 7, 8, 10, 13])
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--baseline-row-ops", default="", help="another row_ops.c to time alongside")
    args = ap.parse_args()
    _, _, model = load_target(ModelConfig(model=args.model))
    runner = TargetRunner(model, CacheConfig(1, args.context + max(args.sizes) + 1))
    slot = runner.allocate()
    builds = {"row_ops.c": row_ops.library()}
    if args.baseline_row_ops:
        builds["baseline"] = row_ops.library(Path(args.baseline_row_ops))
        if builds["baseline"] is None or builds["row_ops.c"] is None:
            raise SystemExit("row_ops.c does not build here: nothing to compare")
    times: dict[tuple[str, int, int], list[float]] = {
        (b, n, t): [] for b in builds for n in args.threads for t in args.sizes}
    with torch.inference_mode():
        runner.prefill(slot, [5] * args.context)
        for rnd in range(args.rounds + 1):  # round 0 warms every shape up and is discarded
            for build, lib in builds.items():
                with row_ops_from(lib):
                    for n in args.threads:
                        torch.set_num_threads(n)
                        for t in args.sizes:
                            start = time.perf_counter()
                            out = runner.verify(slot, 0, Proposal.chain([7] * (t - 1)))
                            float(out.logits[0, -1, 0])
                            if rnd:
                                times[(build, n, t)].append(time.perf_counter() - start)
    print(f"{args.model}, context {args.context}: median ms per verify forward of T tokens "
          f"(ratio to 1 token), {args.rounds} interleaved rounds")
    for build in builds:
        for n in args.threads:
            med = {t: statistics.median(times[(build, n, t)]) for t in args.sizes}
            base = med[min(args.sizes)]
            label = f"{build}, " if len(builds) > 1 else ""
            print(f"  {label}{n} thread(s): " + " ".join(f"{t}:{1e3 * m:.1f} ({m / base:.2f})"
                                                        for t, m in med.items()))


if __name__ == "__main__":
    main()
