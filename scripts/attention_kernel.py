"""row_ops.c's attention alone, this build against another: are the outputs the same bits, and
what does each take? The comparison a change to the attention kernel needs before the whole
forward is timed (scripts/verify_shapes.py --baseline-row-ops).
Usage: python scripts/attention_kernel.py --baseline-row-ops FILE [--threads 1] [--context 256]
[--sizes 1,4,8] [--rounds 7], e.g. after ``git show HEAD~1:aurora_spec/models/row_ops.c >
/tmp/old.c``. It compares ~500 random cases (chains and trees, 1-13 tokens, 0-700 cached keys,
SmolLM2's 9 query heads over 3 key/value heads of 64 floats; then head sizes 128 and 96) bit for
bit, then times 30 layers' worth of calls at ``--context`` per token count, both builds in the
same rounds."""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from aurora_spec.models import row_ops


def attend(lib: Any, qkv: torch.Tensor, heads: tuple[int, int, int], k: torch.Tensor,
           v: torch.Tensor, kv_len: int, mask: torch.Tensor, start: int) -> torch.Tensor:
    """One aurora_attend call of the build ``lib`` (q and k taken as already rotated)."""
    return row_ops.attend_rotated(lib, qkv, heads, k, v, kv_len, mask, 0.125, start)


def inputs(t: int, start: int, heads: tuple[int, int, int], seed: int, tree: bool = False,
           scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q/k/v rows of t tokens after ``start`` cached ones, the cache and the additive mask (a
    chain, or with ``tree`` every odd token blind to the one before it)."""
    nq, nkv, d = heads
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(1, t, (nq + 2 * nkv) * d, generator=g) * scale
    k = torch.randn(1, nkv, start + t + 8, d, generator=g)
    v = torch.randn(1, nkv, start + t + 8, d, generator=g)
    mask = torch.zeros(1, 1, t, start + t)
    for i in range(t):
        mask[0, 0, i, start + i + 1:] = float("-inf")
        if tree and i % 2:
            mask[0, 0, i, start + i - 1] = float("-inf")
    return qkv, k, v, mask


def compare(new: Any, old: Any) -> tuple[int, list[str]]:
    """Cases compared, and a line for each whose outputs differ in any bit."""
    cases = [((9, 3, 64), t, start, tree, scale) for t in (1, 2, 3, 4, 5, 8, 9, 13)
             for start in (0, 1, 5, 7, 8, 63, 100, 255, 256, 511, 700)
             for tree in (False, True) for scale in (1.0, 30.0, 1e-3)]
    cases += [((4, 2, 128), 4, 100, False, 1.0), ((4, 2, 96), 4, 100, False, 1.0)]
    diffs = []
    for n, (heads, t, start, tree, scale) in enumerate(cases):
        qkv, k, v, mask = inputs(t, start, heads, n, tree, scale)
        a, b = (attend(lib, qkv.clone(), heads, k.clone(), v.clone(), start + t, mask, start)
                for lib in (new, old))
        if not torch.equal(a, b):
            diffs.append(f"heads {heads}, {t} tokens after {start}, tree {tree}, q x {scale}: "
                         f"max difference {(a - b).abs().max().item():.3g}")
    return len(cases), diffs


def time_builds(builds: dict[str, Any], t: int, context: int, rounds: int) -> dict[str, float]:
    """Median ms of 30 calls (a forward's layers) per build, rounds interleaved."""
    heads = (9, 3, 64)
    qkv, k, v, mask = inputs(t, context, heads, 0)
    times: dict[str, list[float]] = {name: [] for name in builds}
    for _ in range(rounds):
        for name, lib in builds.items():
            start = time.perf_counter()
            for _ in range(30):
                attend(lib, qkv, heads, k, v, context + t, mask, context)
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--baseline-row-ops", required=True, help="the other row_ops.c")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--sizes", default="1,4,8")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    new, old = row_ops.library(), row_ops.library(Path(args.baseline_row_ops))
    if new is None or old is None:
        raise SystemExit("a row_ops.c build failed (see the log)")
    n, diffs = compare(new, old)
    print(f"{n - len(diffs)}/{n} cases bit-identical")
    for line in diffs:
        print("  differs:", line)
    for t in (int(x) for x in args.sizes.split(",")):
        ms = time_builds({"row_ops.c": new, "baseline": old}, t, args.context, args.rounds)
        print(f"{t} token(s) after {args.context}, {args.threads} thread(s), 30 calls: row_ops.c "
              f"{ms['row_ops.c']:.2f} ms, baseline {ms['baseline']:.2f} ms "
              f"({ms['baseline'] / ms['row_ops.c']:.2f}x)")


if __name__ == "__main__":
    main()
