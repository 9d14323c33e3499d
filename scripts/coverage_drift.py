"""How the draft vocabulary's coverage drifts on a stream with no rebuild, from a bench run's
saved outputs: which coverage a resting trainer should wake on (TrainerConfig.rest_wake_coverage).

    aurora bench --arms none --domains chat,code,math --requests 100 --max-tokens 64 \\
        --threads 2 --save-token-ids --out runs/tokens-day0
    python scripts/coverage_drift.py runs/tokens-day0/results.json --rebuild-at 5,100,160

Replays the run's requests in order through the trainer's ``VocabBuilder`` (prompt tokens
counted for the choice, emitted tokens for coverage too), builds the vocabulary at each request
of ``--rebuild-at`` and never otherwise, and prints every ``--every`` requests: the coverage of
the recent window (what the trainer reports and rebuilds on), the coverage of the tokens emitted
since the last build (the newest window of them: what a resting trainer wakes on), and that
request's own coverage.
"""

from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    from aurora_spec.bench.traffic import load_domain, resolve_traffic_dir
    from aurora_spec.cli import encode_prompt
    from aurora_spec.drafters.eagle3_head import target_to_draft
    from aurora_spec.flywheel.vocab import VocabBuilder
    from aurora_spec.models.loader import load_tokenizer, resolve_model

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="results.json of a bench run with --save-token-ids")
    ap.add_argument("--arm", default="none")
    ap.add_argument("--rebuild-at", required=True, help="request indexes, e.g. 5,100,160")
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--draft-vocab", type=int, default=8192)
    ap.add_argument("--window", type=int, default=4096, help="TrainerConfig.vocab_coverage_window")
    a = ap.parse_args()

    res = json.load(open(a.results))
    reqs = sorted((r for r in res["requests"] if r["arm"] == a.arm), key=lambda r: r["index"])
    if not reqs or "token_ids" not in reqs[0]:
        raise SystemExit(f"{a.results}: no token ids of arm {a.arm!r} (run the bench with "
                         "--save-token-ids)")
    tok = load_tokenizer(resolve_model(a.model))
    traffic = resolve_traffic_dir(None)
    prompts = {p.id: p.prompt for d in {r["domain"] for r in reqs} for p in load_domain(traffic, d)}
    chat = res["config"].get("chat", True)
    rebuild_at = {int(x) for x in a.rebuild_at.split(",")}
    vocab = VocabBuilder(len(tok), a.draft_vocab, window=a.window)
    t2d: torch.Tensor | None = None  # the vocabulary of the last build
    built_at_seen = 0
    print("request domain  window  since-build (tokens)  request")
    for r in reqs:
        if r["index"] in rebuild_at:
            t2d, built_at_seen = target_to_draft(vocab.build(), len(tok)), vocab.seen
        vocab.observe(encode_prompt(tok, prompts[r["prompt_id"]], chat), emitted=False)
        vocab.observe(r["token_ids"])
        if t2d is None or r["index"] % a.every != a.every - 1:
            continue
        since = vocab.seen - built_at_seen
        own = float((t2d[torch.tensor(r["token_ids"])] >= 0).double().mean())
        print(f"{r['index']:7d} {r['domain']:7s} {vocab.coverage(t2d):.3f}   "
              f"{vocab.coverage(t2d, newest=since):.3f} ({min(since, a.window):5d})        "
              f"{own:.2f}")


if __name__ == "__main__":
    main()
