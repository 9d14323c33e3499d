"""Command line: aurora generate | serve | bench | train | export."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable

from aurora_spec.config import DRAFTERS, DTYPES, DrafterConfig, ModelConfig
from aurora_spec.types import InvalidRequestError, SamplingParams


class UsageError(Exception):
    """Bad input detected by the CLI itself: printed as one line, exit code 2."""


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="bundled name (smollm2-135m, gemma3-270m), .gguf path or HF directory")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--max-context", type=int, default=2048, help="KV cache tokens per request")


def add_drafter_flags(p: argparse.ArgumentParser, default: str = "ngram") -> None:
    p.add_argument("--drafter", default=default, choices=DRAFTERS)
    add_draft_flags(p)


LOOKUP_TREE = {"auto": None, "narrow": True, "wide": False}  # -> DrafterConfig.lookup_narrow


def add_draft_flags(p: argparse.ArgumentParser) -> None:
    """How drafts are made, whichever drafter (also for ``aurora bench``, where arms pick it)."""
    p.add_argument("--draft-weights", default=None, help="eagle3 head directory (safetensors)")
    p.add_argument("--draft-vocab", type=int, default=8192, help="eagle3 day-0 draft vocabulary")
    p.add_argument("--tree-width", type=int, default=None,
                   help="> 1 drafts trees of that many branches (default: eagle3 3, ngram 1)")
    p.add_argument("--max-draft", type=int, default=8, help="upper bound of the draft length")
    p.add_argument("--draft-dtype", default="auto", choices=["auto", *sorted(DTYPES)],
                   help="eagle3 head precision (auto: bfloat16 on CPUs with bf16 kernels)")
    p.add_argument("--lookup", action=argparse.BooleanOptionalAction, default=True,
                   help="eagle3: also verify an n-gram lookup chain with the head's tree "
                   "(default: on)")
    p.add_argument("--lookup-tree", default="auto", choices=sorted(LOOKUP_TREE),
                   help="eagle3 + lookup, on a step whose lookup chain adds nodes: verify the "
                   "head's first branch beside it (narrow) or all its branches (wide); auto: "
                   "narrow where the target's measured cost per verified row steps up")


def model_config(a: argparse.Namespace, max_slots: int = 1) -> ModelConfig:
    if a.threads is not None and a.threads <= 0:
        raise UsageError("--threads must be positive")
    if a.max_context <= 16:
        raise UsageError("--max-context must be > 16")
    return ModelConfig(a.model, a.dtype, a.device, a.threads, a.max_context, max_slots)


def check_draft_flags(a: argparse.Namespace, error: type[Exception] = UsageError) -> None:
    if (a.tree_width is not None and a.tree_width < 1) or a.max_draft < 0 or a.draft_vocab < 1:
        raise error("--tree-width and --draft-vocab must be >= 1, --max-draft >= 0")


def drafter_config(a: argparse.Namespace) -> DrafterConfig:
    check_draft_flags(a)
    return DrafterConfig(a.drafter, a.draft_weights, a.draft_vocab, a.tree_width,
                         draft_dtype=a.draft_dtype, lookup=a.lookup,
                         lookup_narrow=LOOKUP_TREE[a.lookup_tree])


def sampling_from_args(a: argparse.Namespace, stop_ids: tuple[int, ...] = ()) -> SamplingParams:
    return SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p,
                          top_k=a.top_k, seed=a.seed, stop_token_ids=stop_ids)


def stop_token_ids(info, tokenizer) -> tuple[int, ...]:
    ids = list(info.eos_token_ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return tuple(ids)


def resolve_chat(tokenizer, chat: bool | None) -> bool:
    """``chat`` as given; None (the train and bench default) means on when the model has a chat
    template (a base model such as gemma3-270m has none), so they see what serving sends."""
    return bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat


def encode_prompt(tokenizer, prompt: str, chat: bool | None) -> list[int]:
    """Token ids of one prompt, through the chat template when ``resolve_chat`` says so."""
    if resolve_chat(tokenizer, chat):
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError("this model has no chat template; drop --chat")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer.encode(prompt, add_special_tokens=False) or tokenizer.encode(prompt)


def cmd_generate(a: argparse.Namespace) -> int:
    from aurora_spec.drafters.policy import PolicyConfig
    from aurora_spec.engine.engine import EngineConfig
    from aurora_spec.runtime import build_runtime

    sampling_from_args(a)  # validate before the (slow) model load
    if not a.prompt:
        raise UsageError("the prompt is empty")
    mcfg, dcfg = model_config(a), drafter_config(a)
    rt = build_runtime(mcfg, dcfg, EngineConfig(PolicyConfig(max_draft=a.max_draft)))
    params = sampling_from_args(a, stop_token_ids(rt.info, rt.tokenizer))
    ids = encode_prompt(rt.tokenizer, a.prompt, a.chat)
    result = rt.engine.generate(ids, params)
    text = rt.tokenizer.decode(list(result.token_ids), skip_special_tokens=True)
    s = result.stats
    if a.json:
        print(json.dumps({"text": text, "token_ids": list(result.token_ids),
                          "finish_reason": result.finish_reason,
                          "stats": {"tau": round(s.tau, 4), "verify_steps": s.verify_steps,
                                    "accepted": s.accepted, "proposed": s.proposed,
                                    "tokens_per_s": round(result.tokens_per_s, 2),
                                    "prompt_tokens": result.prompt_tokens}}))
    else:
        print(text)
        print(f"[{len(result.token_ids)} tokens, {result.tokens_per_s:.1f} tokens/s, "
              f"tau {s.tau:.2f}, {s.accepted}/{s.proposed} drafts accepted, "
              f"drafter {a.drafter}]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aurora", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text for one prompt")
    add_model_flags(g)
    add_drafter_flags(g)
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--chat", action="store_true", help="apply the model's chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.add_argument("prompt")
    g.set_defaults(func=cmd_generate)
    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands() -> list[Callable[[argparse._SubParsersAction], None]]:
    """Commands living in their own modules register themselves here (lazy heavy imports)."""
    out = []
    for module in ("aurora_spec.bench.cli", "aurora_spec.server.cli", "aurora_spec.flywheel.cli"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        out.append(mod.register)
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from aurora_spec.models.loader import ModelLoadError

    try:
        return args.func(args)
    except (UsageError, InvalidRequestError, ModelLoadError, ValueError) as e:
        print(f"aurora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
