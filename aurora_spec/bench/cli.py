"""``aurora bench``: arms side by side on real traffic prompts; results.json + report.md."""

from __future__ import annotations

import argparse
import shlex
import sys

from aurora_spec.bench.arms import arm_builders


def register(sub: argparse._SubParsersAction) -> None:
    from aurora_spec.cli import add_draft_flags, add_model_flags

    p = sub.add_parser(
        "bench", help="benchmark arms side by side on traffic prompts",
        description="Run prompts from the traffic data through every arm in one process, "
        "interleaved per request (batch 1, greedy), and write DIR/results.json, DIR/report.md "
        "and DIR/bench.png. Arms: " + ", ".join(arm_builders()) + " (eagle3:DIR and static:DIR "
        "load a trained head).")
    p.add_argument("--arms", default="none,ngram,eagle3,hf",
                   help="comma-separated arms (default: none,ngram,eagle3,hf); a suffix @wN "
                   "makes one arm draft top-N trees (e.g. online@w3), overriding --tree-width, "
                   "@lookup / @nolookup overrides --lookup for one arm, and @idle runs an "
                   "online arm's trainer under the idle scheduling class (serving keeps every "
                   "thread; the trainer learns on CPU time serving leaves), @share gives it "
                   "one of the threads while it trains (default, as aurora serve chooses: idle "
                   "when the arm starts from a trained head, version > 0, as online-from "
                   "heads from aurora train do; sharing from a day-0 head, as online does), "
                   "@tN gives an online arm's trainer N threads, overriding "
                   "--trainer-threads, and @rest / @norest let its trainer rest or not when "
                   "candidates stop beating the live head (default: a sharing trainer rests, "
                   "an idle-class one does not), and @unpaired rolls a new version back on a "
                   "live acceptance drop alone instead of on the trainer's paired verdict "
                   "(@paired, default); @trainer.FIELD=VALUE / @trace.FIELD=VALUE set one "
                   "field of an online arm's TrainerConfig / TraceConfig "
                   "(aurora_spec/flywheel/config.py), e.g. online@trainer.batch_tokens=128, "
                   "and @policy.FIELD=VALUE one of any engine arm's draft-length "
                   "PolicyConfig (aurora_spec/drafters/policy.py), e.g. "
                   "online@policy.deep_probe_every=8; "
                   "short forms: @shiftgate makes the gate judge on the held-out positions "
                   "since a traffic shift instead of the newest ones (@noshiftgate, default), "
                   "@hN then holds out 1 in N requests, @rN draws N%% of the training batches "
                   "from the newest windows (default 50). Target-only: none takes the faster "
                   "target kernel for one row (F.linear or packed, measured at start), "
                   "none@packed the packed kernels every speculating arm verifies on (the "
                   "exact float32 reference for the lossless check when present)")
    p.add_argument("--domains", default=None,
                   help="comma-separated domains (default: every <domain>.jsonl in --traffic)")
    p.add_argument("--requests", type=int, default=None,
                   help="measured requests per domain, interleaved round-robin (default 8)")
    p.add_argument("--stream", default=None,
                   help="ordered domain segments instead of --domains/--requests, "
                   "e.g. chat:100,code:100")
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens per request")
    add_model_flags(p)
    p.add_argument("--traffic", default=None,
                   help="traffic directory (default: $AURORA_TRAFFIC or ../shared/data/traffic "
                   "next to the repository)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="apply the chat template (default: on when the model has one)")
    add_draft_flags(p)
    p.add_argument("--warmup", type=int, default=2,
                   help="warm-up requests run on every arm first, excluded (default 2)")
    p.add_argument("--seed", type=int, default=0, help="prompt selection and eagle3 init seed")
    p.add_argument("--out", default="bench-results", help="output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    p.add_argument("--concurrency", default=None,
                   help="comma-separated client counts, e.g. 1,2,4,8: closed-loop concurrency "
                   "sweep with continuous batching (engine arms only)")
    p.add_argument("--load", type=float, default=1.0,
                   help="online arms: server utilisation in (0, 1]; below 1 each request is "
                        "followed by (1/load - 1) x its time idle, when only the trainer runs "
                        "(default 1: back to back)")
    p.add_argument("--trainer-threads", type=int, default=None,
                   help="online arms: torch threads of the trainer process (default: every "
                        "thread for an idle-class trainer, one for a sharing one)")
    p.add_argument("--save-token-ids", action="store_true",
                   help="store every output's token ids in results.json (default: a hash)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(a: argparse.Namespace) -> int:
    from aurora_spec.bench.report import check_lines
    from aurora_spec.bench.arms import ArmOptions, BenchError
    from aurora_spec.bench.runner import BenchConfig, run_bench
    from aurora_spec.bench.traffic import parse_domains
    from aurora_spec.cli import LOOKUP_TREE, check_draft_flags, model_config

    if a.stream and (a.domains or a.requests is not None):
        raise BenchError("--stream replaces --domains and --requests: give one or the other")
    if a.requests is not None and a.requests <= 0:
        raise BenchError("--requests must be positive")
    if a.max_tokens <= 0:
        raise BenchError("--max-tokens must be positive")
    check_draft_flags(a, BenchError)
    if not 0.0 < a.load <= 1.0:
        raise BenchError(f"--load is a utilisation in (0, 1], got {a.load}")
    if a.trainer_threads is not None and a.trainer_threads < 1:
        raise BenchError("--trainer-threads must be >= 1")
    cfg = BenchConfig(
        arms=a.arms, domains=parse_domains(a.domains) if a.domains else None,
        requests=a.requests if a.requests is not None else 8, stream=a.stream,
        max_tokens=a.max_tokens, warmup=a.warmup, seed=a.seed, traffic=a.traffic, chat=a.chat,
        model=model_config(a, max_slots=1),
        arm_options=ArmOptions(a.max_draft, a.draft_weights, a.draft_vocab, a.tree_width, a.seed,
                               draft_dtype=a.draft_dtype, lookup=a.lookup,
                               lookup_narrow=LOOKUP_TREE[a.lookup_tree], load=a.load,
                               trainer_threads=a.trainer_threads),
        out=a.out, progress=not a.no_progress, plot=not a.no_plot,
        save_token_ids=a.save_token_ids, concurrency=_levels(a.concurrency),
        command=shlex.join(["aurora", *sys.argv[1:]]) if _invoked_as_cli() else
        shlex.join(["aurora", "bench", *_argv_of(a)]))
    results, written = run_bench(cfg)
    if cfg.concurrency:
        for line in results["checks_concurrency"]:
            print(line)
        print("wrote " + ", ".join(str(p) for p in written))
        return 0
    for name, arm in results["arms"].items():
        print(f"{name:>12}: {_fmt(arm['tokens_per_s'])} tokens/s "
              f"[{_fmt(arm['tokens_per_s_p10'])}-{_fmt(arm['tokens_per_s_p90'])}], "
              f"tau {_fmt(arm['tau'], 2)}, vs none {_fmt(arm['speedup_vs_none'], 2)}x")
    for line in check_lines(results):
        print(line)
    print("wrote " + ", ".join(str(p) for p in written))
    return 130 if results["config"].get("interrupted") else 0


def _levels(spec: str | None) -> list[int] | None:
    from aurora_spec.bench.arms import BenchError

    if not spec:
        return None
    try:
        levels = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise BenchError(f"--concurrency takes integers like 1,2,4,8, got {spec!r}") from None
    if not levels or min(levels) < 1 or max(levels) > 64:
        raise BenchError("--concurrency levels must be between 1 and 64")
    return levels


def _fmt(v: float | None, nd: int = 1) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def _invoked_as_cli() -> bool:
    return len(sys.argv) > 1 and "bench" in sys.argv[1:]


def _argv_of(a: argparse.Namespace) -> list[str]:
    """Rebuild an equivalent command line (when called as main([...]) from Python)."""
    out: list[str] = []
    for key, val in sorted(vars(a).items()):
        flag = "--" + key.replace("_", "-")
        if key == "chat" and val is False:
            out.append("--no-chat")
        if key in ("func", "command", "verbose") or val is None or val is False:
            continue
        out += [flag] if val is True else [flag, str(val)]
    return out
