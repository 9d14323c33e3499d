"""Run benchmark arms side by side on one target model (DESIGN.md section 6).

* One target model is loaded once and shared; every engine arm gets its own TargetRunner (KV
  cache), drafter and Engine, so arms never share speculative state. The ``hf`` arm runs
  transformers' ``generate()`` (greedy, same max new tokens, same stop tokens) on a copy of the
  same weights.
* Arms are **interleaved per request**: request i runs on every arm, in an order rotated by i, so
  machine noise (other processes, thermal drift) hits every arm alike. Warm-up requests run the
  same way first and are excluded.
* Every request yields a record (see ``make_record``). Each arm's greedy output is compared token
  by token with the reference arm's (``none``: target-only through our engine) for the same
  request: in float32 they must be identical; in bfloat16 divergence is measured and reported
  (DESIGN.md section 4).

Extension points (for streams with online learning, concurrency sweeps):

* ``register_arm(kind, builder)`` adds an arm kind; ``--arms kind:ARG`` passes ``ARG`` to it.
  An arm is anything with ``name``, ``kind``, ``run(prompt_ids, max_tokens, domain, request_id)
  -> ArmOutput`` and ``close()``. Engine-backed arms expose ``.engine`` (for batched runs).
* ``run_interleaved`` takes ``on_record`` (called after every measured request) for live plots or
  trainers that must see the stream, and ``BenchConfig.extra_sections`` callbacks may add
  top-level sections to results.json (e.g. ``"concurrency"``).
"""

from __future__ import annotations

import dataclasses

import gc
import hashlib
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from aurora_spec.bench.traffic import Plan, PlannedRequest

log = logging.getLogger(__name__)


class BenchError(ValueError):
    """Bad benchmark configuration: printed as one line, exit code 2."""


# ---------------------------------------------------------------------------------------------
# Arms


@dataclass(frozen=True)
class ArmOutput:
    """One request on one arm. ``token_ids`` never include stop tokens (normalised)."""

    token_ids: tuple[int, ...]
    finish_reason: str
    prompt_tokens: int
    decode_tokens: int  # tokens produced by decode/verify forwards (the prefill token excluded)
    decode_s: float
    prefill_s: float
    tau: float | None = None  # None: the arm does not speculate (hf)
    draft_version: int | None = None
    proposed: int | None = None
    accepted: int | None = None

    @property
    def tokens_per_s(self) -> float | None:
        """Decode tokens/s, prefill excluded (same definition as GenerationResult)."""
        if self.decode_tokens <= 0 or self.decode_s <= 0:
            return None
        return self.decode_tokens / self.decode_s


class Arm(Protocol):
    name: str
    kind: str

    def run(self, prompt_ids: list[int], max_tokens: int, domain: str | None,
            request_id: str) -> ArmOutput: ...

    def close(self) -> None: ...


class EngineArm:
    """Our engine with one drafter (or none: target-only)."""

    def __init__(self, name: str, kind: str, engine: Any, stop_ids: tuple[int, ...]) -> None:
        self.name, self.kind, self.engine, self.stop_ids = name, kind, engine, stop_ids

    def run(self, prompt_ids: list[int], max_tokens: int, domain: str | None,
            request_id: str) -> ArmOutput:
        from aurora_spec.types import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, stop_token_ids=self.stop_ids)
        res = self.engine.generate(list(prompt_ids), params, request_id=request_id,
                                   domain=domain)
        s = res.stats
        speculates = self.engine.drafter is not None
        return ArmOutput(tuple(res.token_ids), res.finish_reason, res.prompt_tokens,
                         s.emitted, s.decode_s, s.prefill_s, s.tau,
                         max(s.draft_versions, default=0),
                         s.proposed if speculates else None, s.accepted if speculates else None)

    def close(self) -> None:
        pass


class _Clock:
    """A generate() streamer that only timestamps: put() #0 is the prompt, #1 the first new
    token (end of prefill), then one per decode forward."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class HfArm:
    """transformers' own ``generate()``: greedy, batch 1, KV cache, same stop tokens."""

    def __init__(self, name: str, model: Any, stop_ids: tuple[int, ...],
                 pad_id: int | None = None) -> None:
        self.name, self.kind, self.model, self.stop_ids = name, "hf", model, stop_ids
        self.pad_id = pad_id if pad_id is not None else (stop_ids[0] if stop_ids else 0)
        self.device = next(model.parameters()).device

    def run(self, prompt_ids: list[int], max_tokens: int, domain: str | None,
            request_id: str) -> ArmOutput:
        from transformers import GenerationConfig
        from transformers.generation.streamers import BaseStreamer

        class Clock(_Clock, BaseStreamer):
            pass

        gen_cfg = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, num_beams=1,
                                   eos_token_id=list(self.stop_ids) or None,
                                   pad_token_id=self.pad_id, use_cache=True)
        ids = torch.tensor([list(prompt_ids)], device=self.device)
        clock = Clock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids),
                                      generation_config=gen_cfg, streamer=clock)
        t_end = time.perf_counter()
        new = [int(t) for t in out[0, len(prompt_ids):].tolist()]
        tokens, finish = normalise_output(new, self.stop_ids, max_tokens)
        first = clock.times[1] if len(clock.times) > 1 else t_end
        return ArmOutput(tokens, finish, len(prompt_ids), max(len(new) - 1, 0), t_end - first,
                         first - t0)

    def close(self) -> None:
        pass


def normalise_output(ids: Sequence[int], stop_ids: Sequence[int],
                     max_tokens: int) -> tuple[tuple[int, ...], str]:
    """Cut at the first stop token (dropped, as our engine drops it) and report why it ended.
    transformers' generate() keeps the EOS token in its output; our engine does not."""
    stops = set(stop_ids)
    for i, t in enumerate(ids):
        if t in stops:
            return tuple(ids[:i]), "stop"
    return tuple(ids), "length" if len(ids) >= max_tokens else "stop"


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token, or None when the sequences are equal. A sequence that
    is a strict prefix of the other diverges where it ends."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# ---------------------------------------------------------------------------------------------
# Building arms


@dataclass(frozen=True)
class ArmOptions:
    max_draft: int = 8
    draft_weights: str | None = None
    draft_vocab: int = 8192
    tree_width: int | None = None  # None: the drafter's default
    seed: int = 0
    calibrate: bool = True
    max_slots: int = 1  # KV cache slots per engine arm (> 1 for concurrency sweeps)


@dataclass
class BenchTarget:
    """The shared target: loaded once, used by every arm."""

    info: Any
    tokenizer: Any
    model: Any  # DecoderModel
    max_context: int
    stop_ids: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    _hf: Any = None

    def hf_model(self) -> Any:
        if self._hf is None:
            from aurora_spec.models.loader import load_hf_model

            device = str(self.model.embed.weight.device)
            self._hf = load_hf_model(self.info.dir, self.dtype, device)
        return self._hf


ArmBuilder = Callable[[BenchTarget, str, str | None, ArmOptions], Arm]
ARM_BUILDERS: dict[str, ArmBuilder] = {}


def register_arm(kind: str, builder: ArmBuilder) -> None:
    """Add an arm kind: ``builder(target, name, arg, options) -> Arm``."""
    ARM_BUILDERS[kind] = builder


def engine_arm(target: BenchTarget, name: str, kind: str, drafter_name: str,
               weights: str | None, opts: ArmOptions) -> EngineArm:
    from aurora_spec.config import DrafterConfig
    from aurora_spec.drafters.policy import PolicyConfig
    from aurora_spec.engine.engine import Engine, EngineConfig
    from aurora_spec.models.runner import CacheConfig, TargetRunner
    from aurora_spec.runtime import make_drafter

    drafter = make_drafter(DrafterConfig(drafter_name, weights, opts.draft_vocab, opts.tree_width,
                                         opts.seed), target.model)
    runner = TargetRunner(target.model, CacheConfig(opts.max_slots, target.max_context))
    engine = Engine(runner, drafter, EngineConfig(PolicyConfig(max_draft=opts.max_draft),
                                                  calibrate=opts.calibrate))
    return EngineArm(name, kind, engine, target.stop_ids)


def _build_none(t: BenchTarget, name: str, arg: str | None, o: ArmOptions) -> Arm:
    return engine_arm(t, name, "none", "none", None, o)


def _build_ngram(t: BenchTarget, name: str, arg: str | None, o: ArmOptions) -> Arm:
    return engine_arm(t, name, "ngram", "ngram", None, o)


def _build_eagle3(t: BenchTarget, name: str, arg: str | None, o: ArmOptions) -> Arm:
    return engine_arm(t, name, "eagle3", "eagle3", arg or o.draft_weights, o)


def _build_static(t: BenchTarget, name: str, arg: str | None, o: ArmOptions) -> Arm:
    if not arg:
        raise BenchError("arm 'static' needs a head directory: static:DIR")
    return engine_arm(t, name, "static", "eagle3", arg, o)


def _build_hf(t: BenchTarget, name: str, arg: str | None, o: ArmOptions) -> Arm:
    pad = getattr(t.tokenizer, "pad_token_id", None)
    return HfArm(name, t.hf_model(), t.stop_ids, pad)


for _kind, _builder in (("none", _build_none), ("ngram", _build_ngram), ("eagle3", _build_eagle3),
                        ("static", _build_static), ("hf", _build_hf)):
    register_arm(_kind, _builder)


@dataclass(frozen=True)
class ArmSpec:
    name: str  # as written on the command line, the key in results.json
    kind: str
    arg: str | None
    tree_width: int | None = None  # ``@wN`` suffix: this arm drafts top-N trees


_TREE_SUFFIX = re.compile(r"@w(\d+)$")


def parse_arms(spec: str) -> list[ArmSpec]:
    """``kind[:ARG][@wN]`` separated by commas, e.g. ``none,online,online@w3,static:DIR``."""
    out: list[ArmSpec] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        tree = _TREE_SUFFIX.search(part)
        width = int(tree.group(1)) if tree else None
        if width is not None and width < 1:
            raise BenchError(f"arm {part!r}: the tree width after @w must be >= 1")
        kind, sep, arg = part[:tree.start()].partition(":") if tree else part.partition(":")
        if kind not in ARM_BUILDERS:
            raise BenchError(f"unknown arm {kind!r} (choose from {', '.join(ARM_BUILDERS)}; "
                             f"some take an argument: kind:ARG)")
        out.append(ArmSpec(part, kind, arg if sep else None, width))
    if not out:
        raise BenchError("--arms is empty")
    names = [a.name for a in out]
    if len(set(names)) != len(names):
        raise BenchError(f"--arms lists an arm twice: {spec}")
    return out


def build_arm(target: BenchTarget, spec: ArmSpec, opts: ArmOptions) -> Arm:
    if spec.tree_width is not None:
        opts = dataclasses.replace(opts, tree_width=spec.tree_width)
    return ARM_BUILDERS[spec.kind](target, spec.name, spec.arg, opts)


# ---------------------------------------------------------------------------------------------
# Running


@dataclass(frozen=True)
class BenchRequest:
    planned: PlannedRequest
    prompt_ids: list[int]

    @property
    def domain(self) -> str:
        return self.planned.prompt.domain


@dataclass
class RunOutcome:
    records: list[dict[str, Any]]
    outputs: dict[tuple[str, int], tuple[int, ...]]  # (arm, index) -> normalised token ids
    interrupted: bool = False
    wall_s: float = 0.0


def token_hash(ids: Sequence[int]) -> str:
    return hashlib.sha1(",".join(map(str, ids)).encode()).hexdigest()[:16]


def make_record(arm: Arm, index: int, req: BenchRequest, out: ArmOutput, order: int,
                save_ids: bool) -> dict[str, Any]:
    tps = out.tokens_per_s
    rec: dict[str, Any] = {
        "arm": arm.name, "index": index, "domain": req.domain, "segment": req.planned.segment,
        "prompt_id": req.planned.prompt.id, "prompt_tokens": out.prompt_tokens,
        "tau": None if out.tau is None else round(out.tau, 4),
        "tokens_per_s": None if tps is None else round(tps, 3),
        "tokens": len(out.token_ids), "decode_tokens": out.decode_tokens,
        "decode_s": round(out.decode_s, 5), "prefill_s": round(out.prefill_s, 5),
        "draft_version": out.draft_version, "proposed": out.proposed, "accepted": out.accepted,
        "finish_reason": out.finish_reason, "order": order,
        "token_ids_sha1": token_hash(out.token_ids), "diverged_at": None,
    }
    if save_ids:
        rec["token_ids"] = list(out.token_ids)
    return rec


def run_interleaved(arms: Sequence[Arm], requests: Sequence[BenchRequest],
                    warmup: Sequence[BenchRequest], max_tokens: int, *, progress: bool = True,
                    save_ids: bool = False,
                    on_record: Callable[[dict[str, Any]], None] | None = None) -> RunOutcome:
    """Request i runs on every arm, starting with arm ``i % len(arms)``; warm-up first."""
    from tqdm import tqdm

    n = len(arms)
    outcome = RunOutcome([], {})
    bar = tqdm(total=(len(warmup) + len(requests)) * n, desc="bench", unit="gen",
               disable=not progress, dynamic_ncols=True, leave=True)
    start = time.perf_counter()
    try:
        for phase, reqs in (("warmup", warmup), ("run", requests)):
            if phase == "run":
                gc.collect()
            for i, req in enumerate(reqs):
                for j in range(n):
                    arm = arms[(i + j) % n]
                    rid = f"{phase}-{i}-{arm.name}"
                    out = arm.run(req.prompt_ids, max_tokens, req.domain, rid)
                    bar.update(1)
                    tps = out.tokens_per_s
                    bar.set_postfix_str(f"{phase} {req.domain} {arm.name} "
                                        f"{(tps or 0):.1f} tok/s", refresh=False)
                    if phase == "warmup":
                        continue
                    rec = make_record(arm, i, req, out, j, save_ids)
                    outcome.records.append(rec)
                    outcome.outputs[(arm.name, i)] = out.token_ids
                    if on_record is not None:
                        on_record(rec)
    except KeyboardInterrupt:
        outcome.interrupted = True
    finally:
        bar.close()
        outcome.wall_s = time.perf_counter() - start
    return outcome


def mark_divergence(outcome: RunOutcome, reference: str | None) -> None:
    """Set each record's ``diverged_at`` (first differing token vs the reference arm's output
    for the same request; None when identical or when there is no reference)."""
    if reference is None:
        return
    for rec in outcome.records:
        ref = outcome.outputs.get((reference, rec["index"]))
        mine = outcome.outputs.get((rec["arm"], rec["index"]))
        if rec["arm"] == reference or ref is None or mine is None:
            continue
        rec["diverged_at"] = first_divergence(mine, ref)


def pick_reference(arms: Sequence[ArmSpec | Arm]) -> str | None:
    """Target-only through our engine (``none``), else transformers (``hf``), else nothing."""
    for kind in ("none", "hf"):
        for a in arms:
            if a.kind == kind:
                return a.name
    return None


# ---------------------------------------------------------------------------------------------
# The whole benchmark


@dataclass
class BenchConfig:
    arms: str = "none,ngram,eagle3,hf"
    domains: list[str] | None = None
    requests: int = 8  # per domain (mixed runs)
    stream: str | None = None
    max_tokens: int = 128
    warmup: int = 2
    seed: int = 0
    traffic: str | None = None
    chat: bool | None = None  # None: on when the tokenizer has a chat template
    model: Any = None  # ModelConfig
    arm_options: ArmOptions = field(default_factory=ArmOptions)
    out: str = "bench-results"
    progress: bool = True
    plot: bool = True
    save_token_ids: bool = False
    concurrency: list[int] | None = None  # run the concurrency sweep instead (issue 5)
    command: str = ""
    extra_sections: list[Callable[[dict[str, Any]], dict[str, Any]]] = field(
        default_factory=list)


def prepare_plan(cfg: BenchConfig, accept: Callable | None = None) -> Plan:
    from aurora_spec.bench.traffic import (
        list_domains,
        make_pools,
        parse_stream,
        plan_mixed,
        plan_stream,
        resolve_traffic_dir,
    )

    traffic_dir = resolve_traffic_dir(cfg.traffic)
    if cfg.stream:
        segments = parse_stream(cfg.stream)
        pools = make_pools(traffic_dir, [s.domain for s in segments], cfg.seed)
        return plan_stream(pools, segments, cfg.warmup, accept)
    domains = cfg.domains or list_domains(traffic_dir)
    pools = make_pools(traffic_dir, domains, cfg.seed)
    return plan_mixed(pools, domains, cfg.requests, cfg.warmup, accept)


def run_bench(cfg: BenchConfig) -> tuple[dict[str, Any], list[Path]]:
    """Load the target once, build every arm, run the plan, write results.json + report.md
    (+ PNG). Returns (results, written paths)."""
    import datetime
    import platform

    import transformers

    from aurora_spec.bench import report
    from aurora_spec.cli import encode_prompt, stop_token_ids
    from aurora_spec.runtime import load_target

    if cfg.max_tokens <= 0:
        raise BenchError("--max-tokens must be positive")
    if cfg.warmup < 0:
        raise BenchError("--warmup must be >= 0")
    specs = parse_arms(cfg.arms)
    prepare_plan(cfg)  # validate traffic and domains before the (slow) model load

    mcfg = cfg.model
    info, tokenizer, model = load_target(mcfg)
    capacity = min(mcfg.max_context, info.context_length)
    chat = cfg.chat
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    encoded: dict[str, list[int]] = {}
    room = cfg.max_tokens + cfg.arm_options.max_draft + 2

    def accept(p) -> bool:
        ids = encoded.get(p.prompt)
        if ids is None:
            ids = encoded[p.prompt] = encode_prompt(tokenizer, p.prompt, chat)
        return 0 < len(ids) and len(ids) + room <= capacity

    plan = prepare_plan(cfg, accept)
    target = BenchTarget(info, tokenizer, model, capacity, stop_token_ids(info, tokenizer),
                         mcfg.torch_dtype())
    if cfg.concurrency:
        return _run_concurrency(cfg, target, specs, plan, encoded)
    arms = [build_arm(target, s, cfg.arm_options) for s in specs]
    try:
        requests = [BenchRequest(p, encoded[p.prompt.prompt]) for p in plan.requests]
        warm = [BenchRequest(p, encoded[p.prompt.prompt]) for p in plan.warmup]
        outcome = run_interleaved(arms, requests, warm, cfg.max_tokens, progress=cfg.progress,
                                  save_ids=cfg.save_token_ids)
        # Arms with internal state (online learners: trainer steps, gates, swaps) report it.
        arm_status = {a.name: a.status() for a in arms if hasattr(a, "status")}
    finally:
        for a in arms:
            a.close()
    reference = pick_reference(arms)
    mark_divergence(outcome, reference)

    config = {
        "command": cfg.command,
        "model": mcfg.model, "model_dir": str(info.dir), "dtype": mcfg.dtype,
        "device": str(model.embed.weight.device), "threads": torch.get_num_threads(),
        "max_tokens": cfg.max_tokens, "max_context": capacity, "arms": [a.name for a in arms],
        "mode": plan.mode, "domains": list(dict.fromkeys(s.domain for s in plan.segments)),
        "segments": [{"domain": s.domain, "count": s.count} for s in plan.segments],
        "requests": len(plan.requests), "warmup": len(plan.warmup), "seed": cfg.seed,
        "chat": chat, "traffic": str(prepare_traffic_dir(cfg)), "greedy": True, "batch_size": 1,
        "max_draft": cfg.arm_options.max_draft, "draft_weights": cfg.arm_options.draft_weights,
        "draft_vocab": cfg.arm_options.draft_vocab, "tree_width": cfg.arm_options.tree_width,
        "reference_arm": reference,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "wall_s": round(outcome.wall_s, 2), "interrupted": outcome.interrupted,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "machine": platform.machine(),
    }
    results = report.build_results(config, arms, outcome.records)
    if arm_status:
        results["arm_status"] = arm_status
    for section in cfg.extra_sections:
        results.update(section(results))
    written = report.write_report(Path(cfg.out), results, plot=cfg.plot)
    return results, written


def prepare_traffic_dir(cfg: BenchConfig) -> Path:
    from aurora_spec.bench.traffic import resolve_traffic_dir

    return resolve_traffic_dir(cfg.traffic)


def _run_concurrency(cfg: BenchConfig, target: BenchTarget, specs: list[ArmSpec], plan: Plan,
                     encoded: dict[str, list[int]]) -> tuple[dict[str, Any], list[Path]]:
    import datetime
    import json

    from aurora_spec.bench.concurrency import concurrency_checks, render_concurrency, run_concurrency
    from aurora_spec.bench.report import _atomic_write

    engine_specs = {s.name: s for s in specs if s.kind != "hf"}  # generate() has no batching
    if not engine_specs:
        raise BenchError("--concurrency needs at least one engine arm (none, ngram, eagle3, ...)")

    def build(name: str, slots: int) -> Any:
        opts = dataclasses.replace(cfg.arm_options, max_slots=slots)
        return build_arm(target, engine_specs[name], opts).engine  # type: ignore[attr-defined]

    prompts = [encoded[p.prompt.prompt] for p in plan.requests]
    conc = run_concurrency(build, list(engine_specs), prompts, cfg.concurrency or [],
                           cfg.max_tokens, target.stop_ids, cfg.progress)
    results = {"config": {
        "command": cfg.command, "model": cfg.model.model, "dtype": cfg.model.dtype,
        "threads": torch.get_num_threads(), "max_tokens": cfg.max_tokens,
        "requests_per_level": len(prompts), "levels": cfg.concurrency,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")},
        "concurrency": conc, "checks_concurrency": concurrency_checks(conc)}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "report.md"]
    _atomic_write(paths[0], json.dumps(results, indent=1) + "\n")
    _atomic_write(paths[1], render_concurrency(results))
    return results, paths
