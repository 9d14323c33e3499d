"""What a verify forward costs per number of tokens, on each thread count, interleaved: the shape the
draft-length policy's cost model learns (drafters/policy.py, CostModel) and how it differs between
the thread counts serving moves between while a trainer shares the cores.
Usage: python scripts/verify_shapes.py [--threads 1,2] [--sizes 1,2,3,4,5,6,7,8,10,13] [--rounds 8]
[--baseline-row-ops FILE] [--baseline-row-kernel FILE]. ``--baseline-row-ops`` also times another
version of models/row_ops.c in the same rounds (before/after a change to it), e.g.
``git show HEAD~1:aurora_spec/models/row_ops.c > /tmp/old.c``; its bits may differ.
``--baseline-row-kernel`` does the same for models/row_kernel.c (its packed layout must be this
one's: the same packed weights are read by both builds), and checks that both give the same
logits. Within a round the builds run in a random order, so a slow moment of the host does not
always fall on the same one."""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import random
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from aurora_spec.config import ModelConfig
from aurora_spec.models import row_ops
from aurora_spec.models.row_kernel import RowLinear
from aurora_spec.models.row_kernel import library as row_kernel_library
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


@contextlib.contextmanager
def row_kernel_from(lib: Any) -> Iterator[None]:
    """Every row-kernel linear alive runs on ``lib`` inside (same packed weights, its code)."""
    linears = [o for o in gc.get_objects() if isinstance(o, RowLinear)]  # the model's, packed
    saved = [lin._linear for lin in linears]
    for lin in linears:
        lin._linear = lib.aurora_linear_bf16 if lin.bf16_weights else lib.aurora_linear
    try:
        yield
    finally:
        for lin, fn in zip(linears, saved):
            lin._linear = fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=ints, default=[1, 2])
    ap.add_argument("--sizes", type=ints, default=[1, 2, 3, 4, 5, 6, 7, 8, 10, 13])
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--baseline-row-ops", default="", help="another row_ops.c to time alongside")
    ap.add_argument("--baseline-row-kernel", default="",
                    help="another row_kernel.c to time alongside")
    args = ap.parse_args()
    _, _, model = load_target(ModelConfig(model=args.model))
    runner = TargetRunner(model, CacheConfig(1, args.context + max(args.sizes) + 1))
    slot = runner.allocate()
    builds: dict[str, Callable[[], contextlib.AbstractContextManager[Any]]] = {
        "current": contextlib.nullcontext}
    if args.baseline_row_ops:
        lib = row_ops.library(Path(args.baseline_row_ops))
        if lib is None or row_ops.library() is None:
            raise SystemExit("row_ops.c does not build here: nothing to compare")
        builds["baseline row_ops.c"] = functools.partial(row_ops_from, lib)
    if args.baseline_row_kernel:
        lib = row_kernel_library(source=Path(args.baseline_row_kernel))
        if lib is None or row_kernel_library() is None:
            raise SystemExit("row_kernel.c does not build here: nothing to compare")
        builds["baseline row_kernel.c"] = functools.partial(row_kernel_from, lib)
    times: dict[tuple[str, int, int], list[float]] = {
        (b, n, t): [] for b in builds for n in args.threads for t in args.sizes}
    check_bits = "baseline row_kernel.c" in builds  # row_ops.c builds may differ in bits
    with torch.inference_mode():
        runner.prefill(slot, [5] * args.context)
        for rnd in range(args.rounds + 1):  # round 0 warms every shape up and is discarded
            for n in args.threads:
                torch.set_num_threads(n)
                for t in args.sizes:
                    logits = {}
                    for build in random.sample(list(builds), len(builds)):
                        with builds[build]():
                            start = time.perf_counter()
                            out = runner.verify(slot, 0, Proposal.chain([7] * (t - 1)))
                            float(out.logits[0, -1, 0])
                            if rnd:
                                times[(build, n, t)].append(time.perf_counter() - start)
                        if check_bits:
                            logits[build] = out.logits.clone()
                    if check_bits and not torch.equal(logits["baseline row_kernel.c"],
                                                      logits["current"]):
                        raise SystemExit(f"row_kernel.c builds give different logits at T={t}")
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
