"""What each verify step of the eagle3 + lookup hybrid was made of, and what other ways of building
the verified tree would have got from the same steps (greedy decoding: counterfactuals exact in
tokens, priced with the verify times measured in the same run).

Per drafting step it records the rows verified, the head's nodes and depth, the lookup chain's
node ids in the merged tree, the accepted path and the verify's wall time; then, for each rule,
tau and the verify time per emitted token relative to the tree as served:
- the lookup chain clipped so the tree stays within B rows (a chain accepted past its clip point
  keeps only the clipped part; the head's part is unchanged);
- the head's tree cut to its first w branches (always, or on steps whose chain adds nodes: what
  ``DrafterConfig.lookup_narrow`` does; or adds at least N nodes; w = 0: the chain alone); a cut
  branch's accepted path is lost, the chain stays.
Exact because the merged tree's accepted path is the longer of the head's and the chain's
(drafters/hybrid.py), and greedy verification of a sub-tree accepts the same path where it is
still there. Prices: the median verify time at each row count served (a count not served takes
the next smaller one's), so a rule that moves steps to row counts rarely served is priced on few
samples. Second-order effects (the lookup drafter learning from clipped outcomes, the policy from
a narrower head) are not modelled: a bench arm measures those.
Usage: python scripts/hybrid_steps.py record --draft-weights DIR --out FILE.json
[--domains chat,code,math] [--requests 20] [--offset 100] [--max-tokens 64] [--threads 2]
[--narrow]; python scripts/hybrid_steps.py analyse FILE.json."""

from __future__ import annotations

import argparse
import collections
import functools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from aurora_spec.drafters.hybrid import _prefix_in  # the hybrid's own attribution

Step = dict[str, Any]


def record(a: argparse.Namespace) -> None:
    from aurora_spec.bench.traffic import resolve_traffic_dir
    from aurora_spec.cli import encode_prompt, stop_token_ids
    from aurora_spec.config import DrafterConfig, ModelConfig
    from aurora_spec.runtime import build_runtime
    from aurora_spec.types import SamplingParams

    torch.set_num_threads(a.threads)
    rt = build_runtime(ModelConfig(threads=a.threads, max_slots=1), DrafterConfig(
        "eagle3", a.draft_weights, lookup=True, lookup_narrow=a.narrow))
    engine: Any = rt.engine
    hybrid: Any = engine.drafter  # a LookupHybrid: its pending steps are read below
    steps: list[Step] = []
    last_verify_s = [0.0]
    verify, observe = engine.runner.verify_batch, hybrid.observe

    def timed_verify(items: list) -> Any:
        t0 = time.perf_counter()
        out = verify(items)
        last_verify_s[0] = time.perf_counter() - t0
        return out

    def recording_observe(trace: Any) -> None:
        pending = hybrid._pending.get(trace.request_id)  # read before observe pops it
        if pending is not None and len(trace.proposal):
            steps.append({"rows": len(trace.proposal) + 1, "head_nodes": len(pending.head_nodes),
                          "head_depth": pending.head_depth, "chain": list(pending.lookup_nodes),
                          "accepted": list(trace.result.accepted_nodes),
                          "verify_s": last_verify_s[0]})
        observe(trace)

    engine.runner.verify_batch, hybrid.observe = timed_verify, recording_observe
    stops = stop_token_ids(rt.info, rt.tokenizer)
    params = SamplingParams(max_tokens=a.max_tokens, stop_token_ids=stops)
    prompts = []
    for domain in a.domains.split(","):
        path = Path(resolve_traffic_dir(None)) / f"{domain}.jsonl"
        lines = path.read_text().splitlines()[a.offset:a.offset + a.requests]
        for line in lines:
            ids = encode_prompt(rt.tokenizer, json.loads(line)["prompt"], True)
            if len(ids) + a.max_tokens < rt.engine.runner.capacity:
                prompts.append(ids)
    engine.generate(prompts[0], SamplingParams(max_tokens=16, stop_token_ids=stops))  # warm-up
    steps.clear()
    for ids in prompts:
        engine.generate(ids, params)
    Path(a.out).write_text(json.dumps({"head": a.draft_weights, "narrow": a.narrow,
                                       "width": hybrid.head_width, "steps": steps}))
    print(f"{len(steps)} drafting steps of {len(prompts)} requests -> {a.out}")


def _chain_accepted(s: Step) -> int:
    return _prefix_in(tuple(s["accepted"]), set(s["chain"]))


def _head_accepted(s: Step, kept: set[int]) -> int:
    return _prefix_in(tuple(s["accepted"]), kept)


def clip_chain(s: Step, budget: int) -> tuple[int, int]:
    """(accepted, rows) with the chain clipped to keep the tree within ``budget`` rows."""
    head = set(range(s["head_nodes"]))
    keep = len(s["chain"])
    while keep and 1 + len(head) + sum(n not in head for n in s["chain"][:keep]) > budget:
        keep -= 1
    rows = 1 + len(head) + sum(n not in head for n in s["chain"][:keep])
    return max(_head_accepted(s, head), min(_chain_accepted(s), keep)), rows


def cut_head(s: Step, branches: int, width: int) -> tuple[int, int]:
    """(accepted, rows) with the head's tree cut to its first ``branches`` branches (nodes are
    depth-major: node d * width + b is branch b)."""
    kept = {n for n in range(s["head_nodes"]) if n % width < branches}
    rows = 1 + len(kept) + sum(n not in kept for n in s["chain"])
    return max(_head_accepted(s, kept), _chain_accepted(s)), rows


def _cut_where_added(s: Step, branches: int, width: int, added: int = 1) -> tuple[int, int]:
    """``cut_head`` on steps whose lookup chain adds at least ``added`` nodes to the head's tree,
    else as served."""
    adds = sum(n >= s["head_nodes"] for n in s["chain"]) >= added
    return cut_head(s, branches if adds else width, width)


def analyse(path: str) -> None:
    data = json.loads(Path(path).read_text())
    steps: list[Step] = data["steps"]
    width = data["width"]
    by_rows = collections.defaultdict(list)
    for s in steps:
        by_rows[s["rows"]].append(s["verify_s"])
    price = {r: statistics.median(t) for r, t in by_rows.items()}
    served = sorted(price)

    def cost(rows: int) -> float:
        return price[max([r for r in served if r <= rows], default=served[0])]

    print(f"{len(steps)} drafting steps ({data['head']}, narrow {data['narrow']})")
    for r in served:
        print(f"  {r:2d} rows: {len(by_rows[r]):5d} steps, median verify {1e3 * price[r]:6.1f} ms")
    base_tokens = sum(len(s["accepted"]) + 1 for s in steps)
    base_s = sum(cost(s["rows"]) for s in steps)

    def line(name: str, rule: Callable[[Step], tuple[int, int]]) -> None:
        out = [rule(s) for s in steps]
        tokens = sum(acc + 1 for acc, _ in out)
        seconds = sum(cost(rows) for _, rows in out)
        print(f"  {name:42s} tau {tokens / len(steps):.3f}  verify ms per token "
              f"{1e3 * seconds / tokens:5.2f}  relative speed "
              f"{(tokens / seconds) / (base_tokens / base_s):.3f}")

    line("as served", lambda s: (len(s["accepted"]), s["rows"]))
    for budget in (4, 5, 6, 7, 8, 10):
        line(f"chain clipped to {budget} rows", functools.partial(clip_chain, budget=budget))
    for w in range(1, width):
        line(f"head width {w} always", functools.partial(cut_head, branches=w, width=width))
        line(f"head width {w} where the chain adds nodes",
             functools.partial(_cut_where_added, branches=w, width=width))
    for w in range(0, width):
        for added in (2, 4, 6):
            line(f"head width {w} where the chain adds >= {added}",
                 functools.partial(_cut_where_added, branches=w, width=width, added=added))
    line("no lookup chain", lambda s: (_head_accepted(s, set(range(s["head_nodes"]))),
                                       1 + s["head_nodes"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("--draft-weights", required=True)
    rec.add_argument("--out", required=True)
    rec.add_argument("--domains", default="chat,code,math")
    rec.add_argument("--requests", type=int, default=20, help="per domain")
    rec.add_argument("--offset", type=int, default=100,
                     help="skip this many prompts of each domain (`aurora train --requests N` "
                     "trains on the first N)")
    rec.add_argument("--max-tokens", type=int, default=64)
    rec.add_argument("--threads", type=int, default=2)
    rec.add_argument("--narrow", action="store_true", help="serve with DrafterConfig.lookup_narrow")
    an = sub.add_parser("analyse")
    an.add_argument("file")
    a = ap.parse_args()
    if a.cmd == "record":
        record(a)
    else:
        analyse(a.file)


if __name__ == "__main__":
    main()
