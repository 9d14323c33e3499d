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

* ``register_arm(kind, builder)`` (arms.py) adds an arm kind; ``--arms kind:ARG`` passes ``ARG``
  to it.
* ``run_interleaved`` takes ``on_record`` (called after every measured request) for live plots or
  trainers that must see the stream, and ``BenchConfig.extra_sections`` callbacks may add
  top-level sections to results.json (e.g. ``"concurrency"``).
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aurora_spec.bench.arms import (
    Arm,
    ArmOptions,
    ArmOutput,
    ArmSpec,
    BenchError,
    BenchTarget,
    build_arm,
    first_divergence,
    parse_arms,
)
from aurora_spec.bench.traffic import Plan, PlannedRequest

log = logging.getLogger(__name__)


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
    if out.threads is not None:  # online arms: 1 while the trainer trains, all while it rests
        rec["threads"] = out.threads  # at its start
        if out.threads_steps:  # verify steps per thread count ({"2": 40, "1": 12}: mixed)
            rec["threads_steps"] = {str(n): c for n, c in sorted(out.threads_steps.items(),
                                                                 reverse=True)}
    if out.tau_head is not None:  # a drafter with a lookup chain: each source's share
        rec["tau_head"] = round(out.tau_head, 4)
        rec["tau_lookup"] = None if out.tau_lookup is None else round(out.tau_lookup, 4)
    if out.policy is not None:  # why the request drafted what it drafted
        rec["policy"] = out.policy
    if out.trainer is not None:  # online arms: the trainer's counters after the request
        rec["trainer"] = out.trainer
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
                    # The same id on every arm (each has its own engine): an online arm with
                    # holdout_blocks off holds out requests by a hash of the id
                    # (flywheel/replay.py), so arms side by side hold out the same requests
                    # whatever their names.
                    rid = f"{phase}-{i}"
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
    """The output reference: target-only through our engine (``none``), the one on the packed
    kernels the speculating arms verify on if there is one (``none@packed``: equal numerics, so
    float32 output must match exactly), else transformers (``hf``), else nothing."""
    nones = [a for a in arms if a.kind == "none"]
    same = [a for a in nones if getattr(a, "target_kernels", None) == "packed"]
    if same or nones:
        return (same or nones)[0].name
    return next((a.name for a in arms if a.kind == "hf"), None)


def kernels_of(arms: Sequence[Arm], which: str = "target_kernels") -> dict[str, str]:
    """Each engine arm's target kernels (EngineArm.target_kernels, for the report's checks), or
    with ``which="draft_kernels"`` each eagle3 arm's draft-head kernels and dtype as chosen at
    load (EngineArm.draft_kernels: ``--draft-dtype auto`` picks by timing, so the run records
    what it served), or with ``which="lookup_tree"`` what an eagle3 + lookup arm verifies beside
    the chain (EngineArm.lookup_tree, also chosen by timing)."""
    return {a.name: k for a in arms if (k := getattr(a, which, None))}


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
    from aurora_spec.cli import encode_prompt, resolve_chat, stop_token_ids
    from aurora_spec.hardware import cpu_isa, cpu_native_bf16
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
    chat = resolve_chat(tokenizer, cfg.chat)
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
        arm_status = {a.name: st for a in arms if hasattr(a, "status") and (st := a.status())}
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
        "draft_dtype": cfg.arm_options.draft_dtype, "lookup": cfg.arm_options.lookup,
        "load": cfg.arm_options.load,
        "reference_arm": reference, "target_kernels": kernels_of(arms),
        "draft_kernels": kernels_of(arms, "draft_kernels"),
        "lookup_tree": kernels_of(arms, "lookup_tree"),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "wall_s": round(outcome.wall_s, 2), "interrupted": outcome.interrupted,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "machine": platform.machine(),
        "cpu_isa": cpu_isa(), "cpu_native_bf16": cpu_native_bf16(),
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
    from aurora_spec.atomic_files import atomic_write_text

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
    atomic_write_text(paths[0], json.dumps(results, indent=1) + "\n")
    atomic_write_text(paths[1], render_concurrency(results))
    return results, paths
