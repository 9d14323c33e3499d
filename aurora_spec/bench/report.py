"""Aggregate benchmark records into results.json, report.md and an optional PNG plot.

results.json::

    {"config": {command, model, dtype, threads, max_tokens, date, ...},
     "arms": {ARM: {"kind", "tokens_per_s" (median over requests), "tokens_per_s_p10",
                    "tokens_per_s_p90", "tokens_per_s_aggregate" (sum tokens / sum time),
                    "tau" (mean), "acceptance" (accepted / proposed), "requests",
                    "per_domain": {d: {"tokens_per_s", "tau", "requests", "speedup_vs_none"}},
                    "speedup_vs_none", "speedup_vs_hf" (ratios of medians),
                    "diverged_requests" (share), "diverged_count", "first_divergence" ([pos])}},
     "checks": [{"name", "status": PASS|FAIL|INFO|SKIP, "value", "threshold", "text"}],
     "requests": [per-request records, see runner.make_record]}

Tokens/s is decode throughput (prefill excluded); speedups are ratios of per-arm medians over the
same requests, measured side by side in one run (DESIGN.md sections 1 and 6).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from aurora_spec.atomic_files import atomic_write_text
from aurora_spec.bench.figures import (fmt_f, fmt_x, mean, median, percentile, ratio, rounded,
                                       stats_of)
from aurora_spec.bench.plots import plot_requests
from aurora_spec.bench.stream_report import (over_time_lines, recovery_lines, thread_lines,
                                             trainer_lines, training_lines)

# The figures issue 2 asks for (README quotes the check lines).
ENGINE_VS_HF_MIN = 1.3  # target-only engine vs transformers generate(), float32
NGRAM_SUMMARIZATION_MIN = 1.5  # ngram vs target-only on summarization
MAX_SLOWDOWN = 0.05  # no drafter slower than target-only by more than 5% on any domain
NON_DRAFTER_KINDS = ("none", "hf")


def first_of_kind(arms: dict[str, dict[str, Any]], kind: str) -> str | None:
    return next((name for name, a in arms.items() if a["kind"] == kind), None)


def summarise(records: list[dict[str, Any]], arms: Iterable[tuple[str, str]],
              reference: str | None = None) -> dict[str, Any]:
    """Per-arm figures from per-request records. ``arms`` is [(name, kind)] in display order;
    ``reference``: the arm whose outputs the records' ``diverged_at`` compare with (default: the
    first none, else hf)."""
    domains = list(dict.fromkeys(r["domain"] for r in records))
    out: dict[str, dict[str, Any]] = {}
    for name, kind in arms:
        recs = [r for r in records if r["arm"] == name]
        tps = [r["tokens_per_s"] for r in recs if r.get("tokens_per_s") is not None]
        taus = [r["tau"] for r in recs if r.get("tau") is not None]
        dec_tokens = sum(r.get("decode_tokens") or 0 for r in recs)
        dec_s = sum(r.get("decode_s") or 0.0 for r in recs)
        proposed = sum(r.get("proposed") or 0 for r in recs)
        accepted = sum(r.get("accepted") or 0 for r in recs)
        div = [r["diverged_at"] for r in recs if r.get("diverged_at") is not None]
        out[name] = {
            "kind": kind,
            "tokens_per_s": median(tps),
            "tokens_per_s_p10": percentile(tps, 10),
            "tokens_per_s_p90": percentile(tps, 90),
            "tokens_per_s_aggregate": dec_tokens / dec_s if dec_s > 0 else None,
            "tau": mean(taus),
            "acceptance": accepted / proposed if proposed else None,
            "requests": len(recs),
            "tokens_mean": mean([r["tokens"] for r in recs]),
            "per_domain": {d: stats_of([r for r in recs if r["domain"] == d]) for d in domains
                           if any(r["domain"] == d for r in recs)},
            "diverged_count": len(div),
            "diverged_requests": len(div) / len(recs) if recs else None,
            "first_divergence": sorted(div),
        }
    none, hf = first_of_kind(out, "none"), first_of_kind(out, "hf")
    reference = reference or none or hf
    for name, a in out.items():
        a["speedup_vs_none"] = ratio(a["tokens_per_s"], out[none]["tokens_per_s"]) if none else None
        a["speedup_vs_hf"] = ratio(a["tokens_per_s"], out[hf]["tokens_per_s"]) if hf else None
        for d, pd in a["per_domain"].items():
            base = out[none]["per_domain"].get(d) if none else None
            pd["speedup_vs_none"] = ratio(pd["tokens_per_s"], base["tokens_per_s"]) if base else None
        if reference is None or name == reference:  # nothing to compare against
            a["diverged_requests"] = None if name != reference else 0.0
    for a in out.values():  # rounding last, ratios above use full precision
        for key in ("tokens_per_s", "tokens_per_s_p10", "tokens_per_s_p90",
                    "tokens_per_s_aggregate", "tau", "acceptance", "tokens_mean",
                    "speedup_vs_none", "speedup_vs_hf", "diverged_requests"):
            a[key] = rounded(a[key], 4)
        for pd in a["per_domain"].values():
            for key in ("tokens_per_s", "tau", "speedup_vs_none"):
                pd[key] = rounded(pd[key], 4)
    return out


def _check(name: str, status: str, value: float | None, threshold: float | None,
           text: str) -> dict[str, Any]:
    return {"name": name, "status": status, "value": rounded(value, 4), "threshold": threshold,
            "text": text}


def evaluate_checks(arms: dict[str, dict[str, Any]], dtype: str, reference: str | None = None,
                    kernels: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The issue-2 figures as explicit PASS/FAIL lines (INFO where no threshold applies, SKIP
    where the run lacks the arms or domain a check needs). ``reference``: the arm outputs were
    compared with (runner.pick_reference; default the first none, else hf); ``kernels``: each
    engine arm's target kernels (packed / plain), when known."""
    checks: list[dict[str, Any]] = []
    none, hf = first_of_kind(arms, "none"), first_of_kind(arms, "hf")
    fp32 = dtype == "float32"

    # 1. Target-only through our engine vs transformers generate().
    if none and hf:
        v = arms[none]["speedup_vs_hf"]
        status = "INFO" if not fp32 else ("PASS" if v is not None and v >= ENGINE_VS_HF_MIN
                                          else "FAIL")
        goal = f">= {ENGINE_VS_HF_MIN:.2f}x in float32" if fp32 else "no threshold in " + dtype
        checks.append(_check("engine_vs_hf", status, v, ENGINE_VS_HF_MIN if fp32 else None,
                             f"target-only engine vs transformers generate(): {fmt_x(v)} "
                             f"({goal})"))
    else:
        checks.append(_check("engine_vs_hf", "SKIP", None, ENGINE_VS_HF_MIN,
                             "target-only engine vs transformers generate(): needs arms none,hf"))

    # 2. ngram on summarization vs target-only.
    ngrams: list[str | None] = [n for n, a in arms.items() if a["kind"] == "ngram"]
    for n in ngrams or [None]:
        pd = arms[n]["per_domain"].get("summarization") if n and none else None
        if pd is None:
            checks.append(_check("ngram_summarization", "SKIP", None, NGRAM_SUMMARIZATION_MIN,
                                 "ngram vs target-only on summarization: needs arms none,ngram "
                                 "and domain summarization"))
            continue
        v = pd["speedup_vs_none"]
        ok = v is not None and v >= NGRAM_SUMMARIZATION_MIN
        checks.append(_check("ngram_summarization", "PASS" if ok else "FAIL", v,
                             NGRAM_SUMMARIZATION_MIN,
                             f"{n} vs target-only on summarization: {fmt_x(v)} "
                             f"(>= {NGRAM_SUMMARIZATION_MIN:.2f}x)"))

    # 3. No drafter slower than target-only by more than 5% on any domain.
    floor = 1 - MAX_SLOWDOWN
    for n, a in arms.items():
        if a["kind"] in NON_DRAFTER_KINDS:
            continue
        if not none:
            checks.append(_check("no_slowdown", "SKIP", None, floor,
                                 f"{n} vs target-only per domain: needs arm none"))
            continue
        ratios = {d: pd["speedup_vs_none"] for d, pd in a["per_domain"].items()
                  if pd["speedup_vs_none"] is not None}
        if not ratios:
            checks.append(_check("no_slowdown", "SKIP", None, floor,
                                 f"{n} vs target-only per domain: no measurements"))
            continue
        worst = min(ratios, key=lambda d: ratios[d])
        ok = ratios[worst] >= floor
        checks.append(_check("no_slowdown", "PASS" if ok else "FAIL", ratios[worst], floor,
                             f"{n} slowest domain vs target-only: {worst} {fmt_x(ratios[worst])} "
                             f"(>= {floor:.2f}x on every domain)"))

    # 4. Losslessness: greedy output identical to target-only (float32); measured in bf16/fp16.
    # Exact equality is what speculation guarantees against the target on the same kernels; a
    # target-only arm on F.linear (faster there for one row) rounds differently, so against it
    # differences are measured, not failed (the bench's none@packed arm is the exact reference).
    reference = reference or none or hf
    kernels = kernels or {}
    for n, a in arms.items():
        if n == reference or reference is None or a["diverged_requests"] is None:
            continue
        share, cnt = a["diverged_requests"], a["diverged_count"]
        where = f", first divergence at {a['first_divergence'][:10]}" if cnt else ""
        what = f"{n} greedy output vs {reference}: {cnt}/{a['requests']} requests differ{where}"
        other = a["kind"] != "hf" and kernels.get(n) != kernels.get(reference)
        if fp32 and a["kind"] != "hf" and not other:
            checks.append(_check("lossless", "PASS" if cnt == 0 else "FAIL", share, 0.0,
                                 what + " (must be 0 in float32)"))
        else:
            note = _why_measured(n, a["kind"], reference, kernels, dtype)
            checks.append(_check("divergence", "INFO", share, None, f"{what} ({note})"))
    return checks


def _why_measured(name: str, kind: str, reference: str, kernels: dict[str, str],
                  dtype: str) -> str:
    """Why an output comparison is reported as measured rather than passed or failed."""
    if kind == "hf":
        return "transformers' kernels, not speculation"
    if kernels.get(name) != kernels.get(reference):
        why = (f"{name} ran the target on {kernels.get(name)} kernels, {reference} on "
               f"{kernels.get(reference)}: they round differently, so this is measured")
        return why if kind == "none" else (why + "; the exact check needs a target-only arm "
                                           "on the same kernels, none@packed")
    return f"measured in {dtype}, DESIGN.md section 4"


def build_results(config: dict[str, Any], arms: Iterable[Any],
                  records: list[dict[str, Any]]) -> dict[str, Any]:
    """``arms``: objects with ``name`` and ``kind`` (or (name, kind) pairs), display order."""
    pairs = [(a.name, a.kind) if hasattr(a, "name") else tuple(a) for a in arms]
    summary = summarise(records, pairs, config.get("reference_arm"))
    return {"config": config, "arms": summary,
            "checks": evaluate_checks(summary, config.get("dtype", "float32"),
                                      config.get("reference_arm"), config.get("target_kernels")),
            "requests": records}


# ---------------------------------------------------------------------------------------------
# Rendering


def check_lines(results: dict[str, Any]) -> list[str]:
    return [f"{c['status']:<4}  {c['text']}" for c in results.get("checks", [])]


def render_markdown(results: dict[str, Any]) -> str:
    cfg, arms = results["config"], results["arms"]
    domains = list(dict.fromkeys(d for a in arms.values() for d in a["per_domain"]))
    lines = ["# aurora bench", "", f"Command: `{cfg.get('command', '')}`", ""]
    lines.append(
        f"Model `{cfg.get('model')}`, {cfg.get('dtype')}, {cfg.get('threads')} thread(s), "
        f"device {cfg.get('device', 'cpu')}, batch 1, greedy, {cfg.get('max_tokens')} max new "
        f"tokens, {cfg.get('requests')} measured requests ({cfg.get('mode')}), "
        f"{cfg.get('warmup')} warm-up excluded, chat template "
        f"{'on' if cfg.get('chat') else 'off'}, seed {cfg.get('seed')}, {cfg.get('date')}."
        + (f" CPU: {' '.join(cfg['cpu_isa'])}." if cfg.get("cpu_isa") else "")
        + (" **Interrupted: partial results.**" if cfg.get("interrupted") else ""))
    lines += ["", "Arms ran side by side in one process, interleaved per request. Tokens/s is "
              "decode throughput (prefill excluded), median over requests [p10-p90]; speedups "
              "are ratios of medians. Per-domain cells: tokens/s median, speedup vs none, tau.",
              ""]
    load = cfg.get("load", 1.0)
    if load < 1.0:
        lines[-1:] = [f"Load {load:g}: each request of an online arm was followed by the idle "
                      f"time of a server at {load:.0%} utilisation ({1 / load - 1:g}x the "
                      "request's time), its trainer running and serving idle; other arms "
                      "skip it (nothing runs).", ""]
    head = ["arm", "tokens/s [p10-p90]", "vs none", "vs hf", "tau", "accept"] + domains + [
        "diverged"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for name, a in arms.items():
        row = [f"`{name}`",
               f"{fmt_f(a['tokens_per_s'])} [{fmt_f(a['tokens_per_s_p10'])}-"
               f"{fmt_f(a['tokens_per_s_p90'])}]",
               fmt_x(a["speedup_vs_none"]), fmt_x(a["speedup_vs_hf"]), fmt_f(a["tau"], 2),
               "-" if a["acceptance"] is None else f"{a['acceptance']:.0%}"]
        for d in domains:
            pd = a["per_domain"].get(d)
            row.append("-" if pd is None else
                       f"{fmt_f(pd['tokens_per_s'])} · {fmt_x(pd['speedup_vs_none'])} · "
                       f"{fmt_f(pd['tau'], 2)}")
        if a["diverged_requests"] is None:
            row.append("-")
        else:
            row.append(f"{a['diverged_count']}/{a['requests']}"
                       + (f" (first at {a['first_divergence'][:5]})" if a["diverged_count"]
                          else ""))
        lines.append("| " + " | ".join(row) + " |")
    lines += over_time_lines(results)
    lines += recovery_lines(results)
    lines += trainer_lines(results)
    lines += thread_lines(results)
    lines += training_lines(results)
    lines += ["", "## Checks", "", "```"] + check_lines(results) + ["```", ""]
    extra = [k for k in results if k not in ("config", "arms", "checks", "requests")]
    if extra:
        lines += ["Other sections in results.json: " + ", ".join(extra) + ".", ""]
    return "\n".join(lines)


def write_report(out_dir: Path, results: dict[str, Any], plot: bool = True) -> list[Path]:
    """Write results.json and report.md (and bench.png when ``plot``); returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "results.json", out_dir / "report.md"]
    atomic_write_text(paths[0], json.dumps(results, indent=1) + "\n")
    atomic_write_text(paths[1], render_markdown(results))
    if plot and results["requests"]:
        try:
            plot_requests(results, out_dir / "bench.png")
            paths.append(out_dir / "bench.png")
        except ImportError:  # matplotlib is optional for the figures themselves
            pass
    return paths

