"""How fast can the draft head learn? A quick offline proxy for the online stream.

The day-0 stream benchmark takes ~35 minutes; this measures the trainer alone in ~15:

    python scripts/learning_curve.py collect --requests 300 --out runs/lc/train.pt
    python scripts/learning_curve.py collect --requests 36 --skip 600 --out runs/lc/held.pt
    python scripts/learning_curve.py fit runs/lc/train.pt runs/lc/held.pt --seconds 720 \\
        --progressive [--prompt]

``collect`` generates target-only greedy answers (64 tokens, chat template) for traffic prompts
(domains interleaved, file order) and keeps the target's fused and final hidden states of every
position. ``fit`` trains a random day-0 head with the online trainer's loss on one thread and
prints the held-out acceptance (mean accepted draft tokens of a greedy 4-token chain, scored on
answer positions only), per-depth acceptance and top-w hit rates at depth 1, against training
seconds. ``--progressive`` feeds the training requests in order, spread over ``--seconds`` (as a
stream delivers them) under the online trainer's reuse cap; ``--prompt`` also trains on prompt
positions.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch

DOMAINS = "chat,code,math"


def collect(a: argparse.Namespace) -> None:
    from aurora_spec.cli import encode_prompt, stop_token_ids
    from aurora_spec.engine.engine import Engine, EngineConfig
    from aurora_spec.flywheel.offline import read_traffic
    from aurora_spec.models.runner import CacheConfig, TargetRunner
    from aurora_spec.runtime import ModelConfig, load_target
    from aurora_spec.types import SamplingParams

    rows = read_traffic(a.traffic, a.domains.split(","), a.requests + a.skip)[a.skip:]
    info, tok, model = load_target(ModelConfig(a.model, "float32", "cpu", a.threads, 2048, 1))
    runner = TargetRunner(model, CacheConfig(1, 2048))
    engine = Engine(runner, None, EngineConfig(calibrate=False))
    stops = stop_token_ids(info, tok)
    data, t0 = [], time.time()
    for i, row in enumerate(rows):
        ids = encode_prompt(tok, row["prompt"], True)[-768:]
        res = engine.generate(ids, SamplingParams(max_tokens=a.max_tokens, stop_token_ids=stops))
        seq = ids + list(res.token_ids)
        slot = runner.allocate()  # one forward over prompt + answer: every position's states
        with torch.inference_mode():
            out = runner.prefill(slot, seq)
        runner.release(slot)
        data.append({"domain": row["domain"], "P": len(ids), "ids": seq,
                     "fused": out.fused_hidden[0].to(torch.bfloat16).clone(),
                     "final": out.final_hidden[0].to(torch.bfloat16).clone()})
        if i % 20 == 0:
            print(f"{i}/{len(rows)} {time.time() - t0:.0f}s", flush=True)
    torch.save(data, a.out)


def windows(data: list[dict], with_prompt: bool, size: int = 128) -> list:
    from aurora_spec.flywheel.batch import Window

    out = []
    for i, d in enumerate(data):
        ids, n, p = d["ids"], len(d["ids"]), d["P"]
        rows = torch.cat((d["fused"], d["final"]), -1)
        s = 0 if with_prompt else p
        while s < n - 2:
            e = min(s + size, n - 2)
            out.append(Window(f"r{i}", d["domain"], s, ids[s:e + 2], rows[s:e + 1],
                              prompt_rows=max(0, min(e + 1, p) - s)))
            s = e
    return out


def fit(a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads)
    from aurora_spec.drafters.eagle3_head import Eagle3Head
    from aurora_spec.flywheel.config import TrainerConfig
    from aurora_spec.flywheel.losses import Embedder, TargetHead, unrolled_forward
    from aurora_spec.flywheel.batch import pack_windows
    from aurora_spec.flywheel.offline import head_config_for
    from aurora_spec.flywheel.trainer import Trainer
    from aurora_spec.flywheel.vocab import VocabBuilder
    from aurora_spec.runtime import ModelConfig, load_target

    _, _, model = load_target(ModelConfig(a.model, "float32", "cpu", a.threads, 2048, 1))
    train, held = torch.load(a.train)[:a.limit], torch.load(a.held)
    train_w, held_w = windows(train, a.prompt), windows(held, False)
    head = Eagle3Head.random(head_config_for(model, a.draft_vocab), seed=0)
    vocab = VocabBuilder(model.spec.vocab_size, a.draft_vocab, window=1)
    for d in train:
        vocab.observe(d["ids"] if a.prompt else d["ids"][d["P"]:])
    vocab.recent.clear()
    vocab.threshold = 0.0
    head.set_vocab(vocab.build())
    cfg = replace(TrainerConfig(), lr=a.lr, lambda_discard=0.0, holdout_every=0,
                  recent_ratio=0.5 if a.progressive else 0.0, reservoir_windows=len(train_w),
                  reservoir_bytes=None, reuse=16.0 if a.progressive else float("inf"),
                  vocab_rebuild_coverage=0.0)
    tr = Trainer(head, TargetHead.from_model(model), Embedder.from_model(model), cfg)
    tr.vocab = vocab
    by_request: dict[str, list] = {}
    for w in train_w:
        by_request.setdefault(w.request_id, []).append(w)
    requests, fed = list(by_request.values()), 0
    print(f"train pairs {sum(w.pairs for w in train_w)}, held-out pairs "
          f"{sum(w.scored_pairs for w in held_w)}", flush=True)
    spent, last = 0.0, 0.0
    while spent < a.seconds:
        want = len(requests) if not a.progressive else max(3, int(len(requests) * spent / a.seconds))
        while fed < min(want, len(requests)):
            tr.add_windows(requests[fed])
            fed += 1
        t0 = time.perf_counter()
        if tr.can_train():
            tr.train_step()
        else:  # the reuse cap: wait for traffic, as the online trainer does
            time.sleep(0.05)
        spent += time.perf_counter() - t0
        if spent - last < a.every and spent < a.seconds:
            continue
        last = spent
        acc, _ = tr.offline_acceptance(tr.head, held_w)
        alpha = [round(x, 3) for x in tr.last_alpha]
        with torch.no_grad():
            b = pack_windows(held_w, with_branches=False)
            tr.head.eval()
            logits = unrolled_forward(tr.head, b, tr.embed, 1, False).logits[0]
            tr.head.train()
            hit = tr.head.d2t[logits.topk(4, -1).indices] == b.truth_c[:, None]
            hit = hit[b.scored_c]
            top_w = [round(float(hit[:, :w].any(-1).float().mean()), 3) for w in (1, 2, 3, 4)]
        print(json.dumps({"seconds": round(spent), "requests_fed": fed,
                          "trained_pairs": tr.stats.trained_pairs, "loss": round(tr.stats.loss, 3),
                          "heldout_acceptance": round(acc, 3), "alpha": alpha, "top_w": top_w,
                          "step_ms": round(tr.stats.step_ms)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=None)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--traffic", default="../shared/data/traffic")
    c.add_argument("--domains", default=DOMAINS)
    c.add_argument("--requests", type=int, default=300)
    c.add_argument("--skip", type=int, default=0, help="skip this many prompts (held-out sets)")
    c.add_argument("--max-tokens", type=int, default=64)
    c.add_argument("--out", required=True)
    f = sub.add_parser("fit")
    f.add_argument("train")
    f.add_argument("held")
    f.add_argument("--seconds", type=float, default=720)
    f.add_argument("--every", type=float, default=180)
    f.add_argument("--progressive", action="store_true")
    f.add_argument("--prompt", action="store_true")
    f.add_argument("--lr", type=float, default=1e-3)
    f.add_argument("--limit", type=int, default=None)
    f.add_argument("--draft-vocab", type=int, default=8192)
    a = ap.parse_args()
    if a.cmd == "collect":
        a.threads = a.threads or 2
        collect(a)
    else:
        a.threads = a.threads or 1
        fit(a)


if __name__ == "__main__":
    main()
