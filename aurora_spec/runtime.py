"""Assemble a ready engine (model, tokenizer, runner, drafter) from configuration."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aurora_spec.config import DRAFTERS, DTYPES, DrafterConfig, ModelConfig
from aurora_spec.drafters.base import Drafter
from aurora_spec.engine.engine import Engine, EngineConfig
from aurora_spec.hardware import cpu_native_bf16
from aurora_spec.models.cpu_linear import packed_kernels_available, time_kernels, time_rows
from aurora_spec.models.loader import ModelInfo, ModelLoadError, load_tokenizer, model_info, resolve_model
from aurora_spec.models.runner import CacheConfig, TargetRunner
from aurora_spec.models.transformer import DecoderModel, UnsupportedModelError, load_decoder

log = logging.getLogger(__name__)
RANDOM_HEAD_PRIOR = 0.05  # a day-0 head: probe first, draft once acceptance is measured
# Default tree width per drafter. eagle3: the top-3 first tokens, each extended greedily. Its
# depth-1 top-3 hit rate is ~1.5x the top-1 rate (0.53 vs 0.36, scripts/learning_curve.py), and a
# 3-node draft verifies as 4 tokens, which the CPU kernels price like 1 (cpu_linear.py); the
# policy prices deeper trees by their w*k + 1 tokens. Measured with a trained code head on code
# and math (docs/bench/HISTORY.md): 1.30x target-only with 3 branches against 1.03x with a chain.
DEFAULT_TREE_WIDTH = {"eagle3": 3, "ngram": 1}
# ``lookup_narrow`` auto: narrow where the target's linears cost at least this much more for the
# rows of a head tree widened by a lookup chain (9) than for a narrowed one (5). An AVX2 host's
# row kernel steps up past 6 rows (a verify of 7-12 rows: 1.3-1.7x one of 2-6), where narrowing
# served 3-5% faster; a host whose cost is flat in the rows keeps the head's siblings (they buy
# ~0.5% of tau, docs/results/day0.md, "The head's siblings beside a lookup chain").
NARROW_COST_STEP = 1.15
NARROW_ROWS = (5, 9)


@dataclass
class Runtime:
    info: ModelInfo
    tokenizer: Any
    model: DecoderModel
    engine: Engine

    @property
    def drafter(self) -> Drafter | None:
        return self.engine.drafter


def load_target(cfg: ModelConfig) -> tuple[ModelInfo, Any, DecoderModel]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model_dir = resolve_model(cfg.model)
    info = model_info(model_dir, cfg.model)
    tokenizer = load_tokenizer(model_dir)
    try:
        model = load_decoder(model_dir, cfg.torch_dtype(), cfg.torch_device())
    except (UnsupportedModelError, OSError) as e:
        raise ModelLoadError(f"cannot load {cfg.model}: {e}") from e
    return info, tokenizer, model


@dataclass(frozen=True)
class DraftDtype:
    """How ``--draft-dtype`` resolves on this device: the dtype the head is loaded in, and
    whether draft_kernels also times a bfloat16 copy of a float32 head (``bf16 head``)."""

    dtype: torch.dtype
    time_bf16_head: bool = False


def draft_dtype(name: str, target: torch.dtype, device: torch.device) -> DraftDtype:
    """The eagle3 head's dtype: ``name`` from DTYPES, or auto. Auto on a CPU that multiplies
    bfloat16 natively (aurora_spec/hardware.py): bfloat16 outright where there are no packed
    kernels to time it against; else the target's dtype, with a bfloat16 copy of the head timed
    beside the float32 kernels (on the AVX512-BF16 host bfloat16 row-kernel copies of a float32
    head beat it, ``python scripts/draft_cost.py``). Elsewhere auto is the target's dtype."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"unknown draft dtype {name!r} (auto, {', '.join(DTYPES)})")
        return DraftDtype(DTYPES[name])
    if device.type != "cpu" or not cpu_native_bf16():
        return DraftDtype(target)
    if not packed_kernels_available():
        return DraftDtype(torch.bfloat16)
    return DraftDtype(target, time_bf16_head=target == torch.float32)


def draft_kernels(head: Any, tree_width: int, bf16_head: bool = False) -> str:
    """How the draft head's linears run (Eagle3Head.use_cpu_kernels): ``F.linear``, ``packed``
    copies, ``packed bf16`` (float32 weights' row-kernel copies stored in bfloat16) or, where
    ``bf16_head`` allows it, ``bf16 head`` (the head cast to bfloat16, packed by oneDNN):
    whichever measures fastest on this CPU for a draft's row counts (1 at the root, one per
    branch below it). Drafts only propose, so neither the kernel nor bfloat16 weights change an
    output. On a plain AVX-512 host F.linear was the cheaper one; on AVX2-only and AVX512-BF16
    hosts bfloat16 copies, which halve what a draft step reads and multiply in float32
    (``python scripts/draft_cost.py``)."""
    if head.fc.weight.device.type != "cpu" or not packed_kernels_available():
        return "F.linear"
    t = time_kernels(head.linear_weights(), rows=(1, tree_width), bf16_weights=True,
                     bf16_head=bf16_head)
    more = "".join(f", {name} {ms:.2f} ms" for name, ms in (
        ("packed bf16", t.packed_bf16_ms), ("bf16 head", t.bf16_head_ms)) if ms is not None)
    log.info("draft head kernels: %s (one pass for %s rows: F.linear %.2f ms, packed %.2f ms%s)",
             t.fastest, "+".join(map(str, t.rows)), t.plain_ms, t.packed_ms, more)
    return t.fastest


def target_kernels(model: DecoderModel, drafting: bool, max_slots: int,
                   choice: str = "auto") -> bool:
    """Whether an engine's target forwards read the packed CPU copies (TargetRunner
    ``packed_kernels``). An engine that verifies drafts must: with them a row's result does not
    depend on how many rows share the call, so a verify gives every token the logits a one-token
    decode gives, and greedy speculation stays token-for-token lossless in float32; so must one
    that batches requests (a request's output must not depend on its neighbours). Only a
    target-only engine serving one request at a time is free to take ``F.linear`` where it
    measures faster: on a plain AVX-512 host oneDNN's packed kernel took 28 ms for a forward's
    linears against F.linear's 21; the float32 row kernel (row_kernel.py) closed that gap (21 vs
    22 ms, ``python scripts/linear_kernels.py --threads 2 --repeats 15``). ``choice="packed"``
    pins the packed kernels (a target-only reference with the speculating engines' numerics).
    The bench's ``none`` arm uses ``auto`` (a fair target-only speed); ``aurora generate`` and
    ``serve`` keep packed, so their ``--drafter none`` gives exactly what every drafter gives."""
    if choice not in ("auto", "packed"):
        raise ValueError(f"target kernels must be auto or packed, got {choice!r}")
    if model.cpu_lm_head is None:  # no packed copies (not a CPU, or oneDNN lacks them)
        return False
    if drafting or max_slots > 1 or choice == "packed":
        return True
    # Timed twice, each kernel keeping its faster median: a noisy second at load (one bench run
    # timed the packed kernel at 40 ms where it takes 22) must not pick a kernel ~1.8x slower
    # for the whole run.
    a, b = (time_kernels(model.linear_weights(), rows=(1,)) for _ in range(2))
    plain, packed = min(a.plain_ms, b.plain_ms), min(a.packed_ms, b.packed_ms)
    log.info("target kernels (target-only, one request at a time): %s (one forward's linears, "
             "the faster of two timings: F.linear %.1f ms, packed %.1f ms)",
             "packed" if packed < plain else "F.linear", plain, packed)
    return packed < plain


def make_drafter(cfg: DrafterConfig, model: DecoderModel) -> Drafter | None:
    if cfg.name not in DRAFTERS:
        raise ValueError(f"unknown drafter {cfg.name!r} (choose from {', '.join(DRAFTERS)})")
    if cfg.name == "none":
        return None
    if cfg.name == "ngram":
        from aurora_spec.drafters.ngram import NgramDrafter

        return NgramDrafter(tree_width=cfg.tree_width or DEFAULT_TREE_WIDTH["ngram"])
    from aurora_spec.drafters.eagle3 import Eagle3Drafter
    from aurora_spec.drafters.eagle3_head import Eagle3Config, Eagle3Head

    device = model.embed.weight.device
    precision = draft_dtype(cfg.draft_dtype, model.embed.weight.dtype, device)
    dtype = precision.dtype
    if cfg.draft_weights:
        head = Eagle3Head.load(Path(cfg.draft_weights), device=device, dtype=dtype)
        _check_head_fits(head, model)
    else:
        head_cfg = Eagle3Config.from_spec(model.spec, cfg.draft_vocab)
        head = Eagle3Head.random(head_cfg, seed=cfg.seed).to(device=device, dtype=dtype)
    width = cfg.tree_width or DEFAULT_TREE_WIDTH["eagle3"]
    kernels = draft_kernels(head, width, precision.time_bf16_head)
    if kernels == "bf16 head":
        head = head.to(dtype=torch.bfloat16)
    learned = Eagle3Drafter(head, model.embed.weight, embed_scale=model.spec.embed_scale,
                            tree_width=width, cpu_kernels=kernels != "F.linear",
                            bf16_weights=kernels == "packed bf16",
                            prior_acceptance=head.rates_at(width) if cfg.draft_weights
                            else RANDOM_HEAD_PRIOR)
    if not cfg.lookup:
        return learned
    from aurora_spec.drafters.hybrid import LookupHybrid
    from aurora_spec.drafters.ngram import NgramDrafter

    narrow = narrow_beside_lookup(model, cfg.lookup_narrow)[0]
    return LookupHybrid(learned, NgramDrafter(tree_width=1), narrow=narrow)


def narrow_beside_lookup(model: DecoderModel, choice: bool | None) -> tuple[bool, float | None]:
    """``DrafterConfig.lookup_narrow`` resolved, with the cost step it was decided on (None where
    it was not measured): ``choice`` where given; else (auto) narrow where one pass over the
    target's linears through the packed kernels a verify uses costs >= ``NARROW_COST_STEP`` times
    as much for ``NARROW_ROWS[1]`` rows as for ``NARROW_ROWS[0]``. Without packed copies (a GPU)
    more rows cost next to nothing: keep the siblings. Either way the output is unchanged."""
    if choice is not None:
        return choice, None
    kernels = model.linear_kernels()
    if kernels is None:
        return False, None
    ms = time_rows(model.linear_weights(), kernels, NARROW_ROWS)
    few, many = ms[NARROW_ROWS[0]], ms[NARROW_ROWS[1]]
    step = many / few
    narrow = step >= NARROW_COST_STEP
    log.info("lookup chain beside the head's tree: %s (target linears, %d rows %.1f ms, %d rows "
             "%.1f ms: %.2fx)", "first branch only" if narrow else "all branches", NARROW_ROWS[0],
             few, NARROW_ROWS[1], many, step)
    return narrow, step


def _check_head_fits(head: Any, model: DecoderModel) -> None:
    c, s = head.config, model.spec
    if (c.hidden_size, c.target_vocab_size, tuple(c.target_layers)) != (
            s.hidden_size, s.vocab_size, s.hidden_layers()):
        raise ValueError(f"draft head (hidden {c.hidden_size}, vocab {c.target_vocab_size}, layers "
                         f"{tuple(c.target_layers)}) does not fit this target (hidden "
                         f"{s.hidden_size}, vocab {s.vocab_size}, layers {s.hidden_layers()})")


def build_runtime(mcfg: ModelConfig, dcfg: DrafterConfig,
                  ecfg: EngineConfig | None = None, trace_sink=None) -> Runtime:
    info, tokenizer, model = load_target(mcfg)
    drafter = make_drafter(dcfg, model)
    # Packed kernels in every engine here, target-only included: ``aurora generate --drafter
    # none`` is the exact float32 reference of every drafter's output (target_kernels).
    runner = TargetRunner(model, CacheConfig(mcfg.max_slots, mcfg.max_context))
    engine = Engine(runner, drafter, ecfg or EngineConfig(), trace_sink)
    return Runtime(info, tokenizer, model, engine)
