"""Time all linears of one forward of a model, F.linear (MKL) vs oneDNN-packed (cpu_linear.py),
for 1-16 rows, interleaved (cpu_linear.time_kernels).
Usage: python scripts/linear_kernels.py [--model M] [--threads N]."""

from __future__ import annotations

import argparse

import torch

from aurora_spec.models.cpu_linear import time_kernels
from aurora_spec.models.loader import resolve_model
from aurora_spec.models.transformer import load_decoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_decoder(resolve_model(args.model), getattr(torch, args.dtype), cpu_kernels=False)
    weights = model.linear_weights()  # the same set runtime.target_kernels times
    rows_list = (1, 2, 3, 4, 8, 16)
    timings = [time_kernels(weights, (rows,), args.repeats) for rows in rows_list]
    print(f"{args.model} {args.dtype} {args.threads} thread(s): ms for all linears of one forward")
    print(f"{'rows':24s}" + "".join(f"{r:>7d}" for r in rows_list))
    print(f"{'F.linear (MKL)':24s}" + "".join(f"{t.plain_ms:7.0f}" for t in timings))
    print(f"{'oneDNN, packed':24s}" + "".join(f"{t.packed_ms:7.0f}" for t in timings))


if __name__ == "__main__":
    main()
