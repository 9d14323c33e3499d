"""Where a decode step's time goes: cProfile over greedy generations of traffic prompts through
the engine ``aurora generate`` builds (packed target kernels), printed by each function's own time.
Usage: python scripts/profile_decode.py [--draft-weights DIR] [--drafter eagle3|ngram|none]
[--domain chat] [--requests 8] [--max-tokens 64] [--threads 2] [--lookup] [--fixed-draft K]
[--top 25]. ``--fixed-draft`` drafts K deep every step (no adaptive policy), so a head that the
policy would switch off (a weak one) still shows what drafting costs per step."""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
from pathlib import Path

import torch


def main() -> None:
    from aurora_spec.bench.traffic import resolve_traffic_dir
    from aurora_spec.cli import encode_prompt, stop_token_ids
    from aurora_spec.config import DrafterConfig, ModelConfig
    from aurora_spec.drafters.policy import PolicyConfig
    from aurora_spec.engine.engine import EngineConfig
    from aurora_spec.runtime import build_runtime
    from aurora_spec.types import SamplingParams

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--drafter", default="eagle3")
    ap.add_argument("--draft-weights", default=None)
    ap.add_argument("--lookup", action="store_true", help="eagle3: also the n-gram lookup chain")
    ap.add_argument("--domain", default="chat")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fixed-draft", type=int, default=None, help="draft depth every step")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rt = build_runtime(ModelConfig(threads=a.threads, max_slots=1),
                       DrafterConfig(a.drafter, a.draft_weights, lookup=a.lookup),
                       EngineConfig(policy=PolicyConfig(fixed_draft=a.fixed_draft)))
    path = Path(resolve_traffic_dir(None)) / f"{a.domain}.jsonl"
    prompts = [json.loads(line)["prompt"] for line in path.open()][:a.requests]
    stops = stop_token_ids(rt.info, rt.tokenizer)
    ids = [encode_prompt(rt.tokenizer, p, True) for p in prompts]
    rt.engine.generate(ids[0], SamplingParams(max_tokens=16, stop_token_ids=stops))  # warm-up
    prof = cProfile.Profile()
    steps = tokens = 0
    decode_s = 0.0
    prof.enable()
    for x in ids:
        res = rt.engine.generate(x, SamplingParams(max_tokens=a.max_tokens, stop_token_ids=stops))
        steps += res.stats.verify_steps
        tokens += res.stats.emitted
        decode_s += res.stats.decode_s
    prof.disable()
    print(f"{len(ids)} requests: {steps} verify steps, {tokens} tokens (tau "
          f"{tokens / max(steps, 1):.2f}), {1e3 * decode_s / max(steps, 1):.1f} ms per step, "
          f"{tokens / decode_s:.1f} tokens/s (under cProfile)")
    pstats.Stats(prof).sort_stats("tottime").print_stats(a.top)


if __name__ == "__main__":
    main()
