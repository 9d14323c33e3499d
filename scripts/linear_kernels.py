"""Time all linears of one forward of a model, F.linear (MKL) vs oneDNN-packed (cpu_linear.py),
for 1-16 rows, interleaved. Usage: python scripts/linear_kernels.py [--model M] [--threads N]."""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from aurora_spec.models.cpu_linear import CpuLinear
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
    weights: list[torch.Tensor] = [p for n, p in model.named_parameters()
                                   if p.dim() == 2 and n != "embed.weight"]
    weights.append(model.lm_head.weight)
    packed = [CpuLinear(w) for w in weights]
    rows_list = (1, 2, 3, 4, 8, 16)
    times: dict[tuple[int, str], list[float]] = {}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for rows in rows_list:
                xs = {k: torch.randn(rows, k, dtype=weights[0].dtype) for k in
                      {w.shape[1] for w in weights}}
                for name in ("F.linear (MKL)", "oneDNN, packed"):
                    start = time.perf_counter()
                    for w, p in zip(weights, packed, strict=True):
                        x = xs[w.shape[1]]
                        F.linear(x, w) if name.startswith("F.") else p(x)
                    times.setdefault((rows, name), []).append(time.perf_counter() - start)
    print(f"{args.model} {args.dtype} {args.threads} thread(s): ms for all linears of one forward")
    print(f"{'rows':24s}" + "".join(f"{r:>7d}" for r in rows_list))
    for name in ("F.linear (MKL)", "oneDNN, packed"):
        print(f"{name:24s}" + "".join(f"{1000 * statistics.median(times[(r, name)]):7.0f}"
                                       for r in rows_list))


if __name__ == "__main__":
    main()
