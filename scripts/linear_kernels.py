"""Time all linears of one forward of a model through each CPU kernel (F.linear (MKL), oneDNN
packed, the row kernel of row_kernel.py) for several row counts, interleaved so a noisy moment
hits all (cpu_linear.time_passes).
Usage: python scripts/linear_kernels.py [--model M] [--threads N] [--dtype float32|bfloat16]
[--rows 1,2,3,4,5,6,8,16] [--repeats 7] [--baseline-source FILE].
--baseline-source adds another version of row_kernel.c (before/after a kernel change), e.g.
``git show c6bf543:aurora_spec/models/row_kernel.c > /tmp/old.c``; its bits may differ."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from aurora_spec.models.cpu_linear import CpuLinear, Kernel, plain_kernels, time_passes
from aurora_spec.models.loader import resolve_model
from aurora_spec.models.row_kernel import RowLinear, library, supports
from aurora_spec.models.transformer import load_decoder


def kernels(weights: list[torch.Tensor], baseline: str) -> dict[str, list[Kernel]]:
    out: dict[str, list[Kernel]] = {
        "F.linear (MKL)": plain_kernels(weights),
        "oneDNN, packed": [CpuLinear(w, use_row_kernel=False) for w in weights]}
    if all(supports(w) for w in weights):
        out["row kernel"] = [RowLinear(w) for w in weights]
        if baseline:
            lib = library(source=Path(baseline))
            if lib is None:  # else RowLinear would silently time the default build
                raise SystemExit(f"{baseline} did not build (the log says why)")
            out["row kernel, baseline"] = [RowLinear(w, lib=lib) for w in weights]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--rows", default="1,2,3,4,5,6,8,16", help="comma-separated row counts")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--baseline-source", default="", help="another row_kernel.c to time")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_decoder(resolve_model(args.model), getattr(torch, args.dtype), cpu_kernels=False)
    weights = model.linear_weights()  # the same set runtime.target_kernels times
    by_kernel = kernels(weights, args.baseline_source)
    rows_list = [int(r) for r in args.rows.split(",")]
    table = [time_passes(weights, by_kernel, (rows,), args.repeats) for rows in rows_list]
    print(f"{args.model} {args.dtype} {args.threads} thread(s): ms for all linears of one forward")
    print(f"{'rows':24s}" + "".join(f"{r:>7d}" for r in rows_list))
    for name in by_kernel:
        print(f"{name:24s}" + "".join(f"{t[name]:7.0f}" for t in table))


if __name__ == "__main__":
    main()
