"""``aurora train``: fit a draft head offline from traffic prompts (the well-trained static
speculator baseline). ``aurora export``: write a head in the EAGLE-3 checkpoint layout."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_TRAFFIC = "../shared/data/traffic"


def register(sub: argparse._SubParsersAction) -> None:
    from aurora_spec.cli import add_model_flags

    t = sub.add_parser("train", help="fit a draft head offline by generating with the target "
                                     "from traffic prompts")
    add_model_flags(t)
    t.add_argument("--traffic", default=DEFAULT_TRAFFIC,
                   help="traffic directory (<domain>.jsonl files) or one .jsonl file")
    t.add_argument("--out", required=True, help="output head directory (for --draft-weights)")
    t.add_argument("--domains", default=None, help="comma-separated domains (default: all)")
    t.add_argument("--requests", type=int, default=200, help="prompts to generate from")
    t.add_argument("--max-tokens", type=int, default=128, help="new tokens per prompt")
    t.add_argument("--max-prompt-tokens", type=int, default=768)
    t.add_argument("--epochs", type=float, default=4.0)
    t.add_argument("--draft-vocab", type=int, default=8192)
    t.add_argument("--init", default=None, help="start from this head directory")
    t.add_argument("--batch-tokens", type=int, default=512)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--depth", type=int, default=3, help="training-time-test unroll depth")
    t.add_argument("--tree-width", type=int, default=None,
                   help="branches at depth 1 of the drafts the held-out measure scores, the "
                        "width the head will be served with (default: eagle3's, 3); its "
                        "per-depth rates seed the serving policy at that width")
    t.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="apply the model's chat template to prompts (default: on when the model "
                        "has one, as aurora bench does)")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("export", help="write a draft head in the EAGLE-3 checkpoint layout")
    e.add_argument("head", help="head directory (head.safetensors + head.json)")
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--max-position-embeddings", type=int, default=2048)
    e.set_defaults(func=cmd_export)


def cmd_train(a: argparse.Namespace) -> int:
    import torch

    from aurora_spec.cli import encode_prompt, model_config, stop_token_ids
    from aurora_spec.drafters.eagle3_head import Eagle3Head
    from aurora_spec.engine.engine import Engine, EngineConfig
    from aurora_spec.flywheel.checkpoints import check_fits
    from aurora_spec.flywheel.config import TrainerConfig
    from aurora_spec.flywheel.offline import collect, fit, read_traffic
    from aurora_spec.models.runner import CacheConfig, TargetRunner
    from aurora_spec.runtime import DEFAULT_TREE_WIDTH, load_target

    # ValueError, not aurora_spec.cli.UsageError: under `python -m aurora_spec.cli` that class
    # lives in __main__ and a different copy would escape main()'s handler. Same exit code 2.
    if a.requests < 1 or a.max_tokens < 1 or a.epochs <= 0 or a.draft_vocab < 1 \
            or (a.tree_width is not None and a.tree_width < 1):
        raise ValueError("--requests, --max-tokens, --draft-vocab, --tree-width must be >= 1, "
                         "--epochs > 0")
    domains = [d.strip() for d in a.domains.split(",")] if a.domains else None
    if not Path(a.traffic).exists():
        raise ValueError(f"traffic path not found: {a.traffic}")
    rows = read_traffic(a.traffic, domains, a.requests)
    mcfg = model_config(a)
    info, tokenizer, model = load_target(mcfg)
    init = None
    if a.init:
        w = model.embed.weight
        init = Eagle3Head.load(a.init, device=w.device, dtype=torch.float32)
        check_fits(init, model)
    runner = TargetRunner(model, CacheConfig(1, mcfg.max_context))
    engine = Engine(runner, None, EngineConfig(calibrate=False))
    room = mcfg.max_context - a.max_tokens - 2

    def prompts():
        for row in rows:
            ids = encode_prompt(tokenizer, row["prompt"], a.chat)
            ids = ids[-min(room, a.max_prompt_tokens):]
            yield ids, row.get("domain")

    t0 = time.perf_counter()

    def progress(i: int, toks: int) -> None:
        if i % 10 == 0 or i == len(rows):
            dt = time.perf_counter() - t0
            print(f"[generate] {i}/{len(rows)} prompts, {toks} tokens, {toks / dt:.1f} tokens/s",
                  file=sys.stderr)

    got = collect(engine, prompts(), a.max_tokens, stop_token_ids(info, tokenizer),
                  progress=progress)
    cfg = TrainerConfig(lr=a.lr, depth=a.depth, batch_tokens=a.batch_tokens, seed=a.seed,
                        lambda_discard=0.0, holdout_every=20,
                        score_width=a.tree_width or DEFAULT_TREE_WIDTH["eagle3"])
    device = "cuda" if mcfg.torch_device().type == "cuda" else "cpu"
    head, metrics = fit(model, got.records, got.prompt_tokens, cfg, a.epochs, a.draft_vocab, init,
                        device, report=lambda r: print(f"[train] {json.dumps(r)}",
                                                       file=sys.stderr))
    out = Path(a.out)
    head.save(out)
    summary = {"model": a.model, "traffic": str(a.traffic), "domains": domains,
               "requests": len(rows), "generated_tokens": got.output_tokens,
               "generate_s": round(got.seconds, 1), "epochs": a.epochs, **metrics}
    (out / "train.json").write_text(json.dumps(summary, indent=2))
    final = metrics["history"][-1]["heldout_acceptance"]
    print(f"wrote {out} (version {head.version}; held-out acceptance {final:.3f} draft tokens "
          f"per step at depth {cfg.gate_depth}; vocab coverage {metrics['vocab_coverage']})")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from aurora_spec.drafters.eagle3_head import Eagle3Head
    from aurora_spec.flywheel.export import export_eagle3

    head = Eagle3Head.load(a.head)
    out = export_eagle3(head, a.out, a.max_position_embeddings)
    print(f"wrote {out}/model.safetensors and config.json (EAGLE-3 layout, version {head.version})")
    return 0
