"""What one draft token costs serving: ``Eagle3Drafter.propose`` on the bundled model's head with
plain ``F.linear`` weights, with the packed copies serving uses on CPU (the row kernel where it
builds, else oneDNN), with float32 weights whose row-kernel copies are stored in bfloat16
(``packed bf16``, what runtime.draft_kernels picks where it measures fastest), and with a
bfloat16 head (``bf16 head``: what ``--draft-dtype auto`` served on CPUs with bf16 kernels until
0f29e9e, now timed beside the others), interleaved; the names are runtime.draft_kernels' own.
Usage: python scripts/draft_cost.py [--threads N] [--dtype TARGET_DTYPE]."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from aurora_spec.drafters.eagle3 import Eagle3Drafter
from aurora_spec.drafters.eagle3_head import Eagle3Config, Eagle3Head
from aurora_spec.models.loader import resolve_model
from aurora_spec.models.transformer import load_decoder
from aurora_spec.types import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--draft-vocab", type=int, default=8192)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = load_decoder(resolve_model(args.model), dtype)
    cfg = Eagle3Config.from_spec(model.spec, args.draft_vocab)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.spec.vocab_size, (args.context + 1,), generator=g).tolist()
    hidden = torch.randn(args.context, 3 * model.spec.hidden_size, generator=g).to(dtype)
    drafters = {}
    for name, packed, bf16_weights, head_dtype in (
            ("F.linear", False, False, dtype), ("packed", True, False, dtype),
            ("packed bf16", True, True, dtype), ("bf16 head", True, False, torch.bfloat16)):
        head = Eagle3Head.random(cfg).to(dtype=head_dtype)
        d = Eagle3Drafter(head, model.embed.weight, model.spec.embed_scale, cpu_kernels=packed,
                          bf16_weights=bf16_weights)
        d.start("r", ids[:-1], ids[-1], hidden)
        drafters[name] = d
    params = SamplingParams()
    times: dict[str, list[float]] = {n: [] for n in drafters}
    with torch.inference_mode():
        for d in drafters.values():  # warm-up (and the prompt's catch-up)
            d.propose("r", ids, args.k, params)
        for _ in range(args.repeats):
            for name, d in drafters.items():
                start = time.perf_counter()
                d.propose("r", ids, args.k, params)  # re-runs the last pair, then k - 1 steps
                times[name].append((time.perf_counter() - start) / args.k)
    print(f"{args.model} {args.dtype} target, {args.threads} thread(s), draft vocab {args.draft_vocab}, "
          f"context {args.context}: ms per draft token (median of {args.repeats} proposals of "
          f"{args.k})")
    for name, ts in times.items():
        print(f"  {name:20s} {1000 * statistics.median(ts):6.2f}")


if __name__ == "__main__":
    main()
