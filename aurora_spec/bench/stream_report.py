"""The report.md sections of streams and online arms: tau and tokens/s over ranges of requests,
recovery after each domain change, the trainers at the end of the run, what serving on fewer
threads (a trainer sharing the cores) cost per request, and which of those training periods put
a new version live."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from aurora_spec.bench.figures import fmt_f, fmt_x, mean, median, ratio, stats_of


def request_ranges(recs: list[dict[str, Any]], block: int = 50) -> list[tuple[str, int, int]]:
    """Rows of the over-time table, as (label, first index, end index): the first 10 requests,
    then the stream's segments (a mixed run: blocks of ``block``), the last ``block``, all."""
    n = max((r["index"] for r in recs), default=-1) + 1
    spans: dict[int, list[int]] = {}
    for r in recs:
        lo_hi = spans.setdefault(r.get("segment") or 0, [r["index"], r["index"] + 1])
        lo_hi[0], lo_hi[1] = min(lo_hi[0], r["index"]), max(lo_hi[1], r["index"] + 1)
    domain = {r["index"]: r.get("domain") for r in recs}
    if len(spans) > 1:
        rows = [(f"segment {k}: {domain.get(lo)} ({lo}-{hi - 1})", lo, hi)
                for k, (lo, hi) in sorted(spans.items())]
    else:
        rows = [(f"{lo}-{min(lo + block, n) - 1}", lo, min(lo + block, n))
                for lo in range(0, n, block)]
    rows = [(f"first 10 (0-{min(10, n) - 1})", 0, min(10, n))] + rows
    if len(spans) > 2:  # the domain-shift goal's range: every segment after the first
        first_change = sorted(spans.values())[1][0]
        rows.append((f"after the first change ({first_change}-{n - 1})", first_change, n))
    if n > block and (n - block, n) not in {(lo, hi) for _, lo, hi in rows}:
        rows.append((f"last {block} ({n - block}-{n - 1})", n - block, n))
    return rows + [(f"all (0-{n - 1})", 0, n)]


def reference_arm(names: Sequence[str]) -> str | None:
    """The arm the over-time table compares with: ``none`` (target-only) when the run has it,
    else the first static head (the domain-shift goal's baseline)."""
    return "none" if "none" in names else static_arm(names)


def static_arm(names: Sequence[str]) -> str | None:
    """The first static head of a run: the domain-shift goal's baseline."""
    return next((a for a in names if a.startswith("static:")), None)


def over_time_lines(results: dict[str, Any]) -> list[str]:
    """Per arm, tau (the head alone's, for eagle3 + lookup), median tokens/s and its ratio to
    the reference arm over ranges of request indices: how an online arm's speed develops."""
    recs = results.get("requests") or []
    names = list(results["arms"])
    if not recs or max(r["index"] for r in recs) < 20:
        return []
    ref_arm = reference_arm(names)
    # beside none, online arms are also compared with the static head (the shift goal's ratio)
    static = static_arm(names) if ref_arm == "none" else None
    lines = ["", "## Requests over time", "",
             "Per arm: mean tau (mean tau of the learned head alone), median tokens/s"
             + (f", ratio to `{ref_arm}` over the same requests" if ref_arm else "")
             + (f"; online arms also their ratio to `{static}`." if static else "."), "",
             "| requests | " + " | ".join(f"`{a}`" for a in names) + " |",
             "|" + "---|" * (len(names) + 1)]

    def vs(st: dict[str, Any], base: dict[str, Any] | None, suffix: str = "") -> str:
        if base is None or not base["requests"]:
            return ""
        return f" · {fmt_x(ratio(st['tokens_per_s'], base['tokens_per_s']))}{suffix}"

    for label, lo, hi in request_ranges(recs):
        mine = {a: [r for r in recs if r["arm"] == a and lo <= r["index"] < hi] for a in names}
        stats = {a: stats_of(rs) for a, rs in mine.items()}
        ref = stats[ref_arm] if ref_arm else None
        base = stats[static] if static else None
        cells = []
        for a in names:
            st = stats[a]
            head = mean([r["tau_head"] for r in mine[a] if r.get("tau_head") is not None])
            cells.append(f"{fmt_f(st['tau'], 2)}" + (f" ({fmt_f(head, 2)})" if head else "")
                         + f" · {fmt_f(st['tokens_per_s'])}"
                         + ("" if a == ref_arm else vs(st, ref))
                         + (vs(st, base, " vs static") if a.startswith("online") else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def trainer_lines(results: dict[str, Any]) -> list[str]:
    """Per online arm, its trainer at the end of the run (``arm_status``): what it cost and what
    it put live."""
    status = {a: st for a, st in (results.get("arm_status") or {}).items()
              if "trainer_step" in st}
    if not status:
        return []

    def cell(st: dict[str, Any], key: str) -> str:
        return "-" if st.get(key) is None else f"{st[key]:g}"

    lines = ["", "## Trainers", "",
             "Per online arm at the end of the run: optimizer steps; the trainer process's CPU "
             "time and wall time per step (moving averages; the wall time includes time "
             "serving ran meanwhile); versions swapped in, rolled back; gates judged (refused); "
             "rests.", "",
             "| arm | steps | CPU ms / step | wall ms / step | swaps | rollbacks | gates "
             "(refused) | rests |", "|" + "---|" * 8]
    for a, st in status.items():
        lines.append(f"| `{a}` | " + " | ".join([
            cell(st, "trainer_step"), cell(st, "step_cpu_ms"), cell(st, "step_ms"),
            cell(st, "swaps"), cell(st, "rollbacks"),
            f"{cell(st, 'gates')} ({cell(st, 'gate_rejections')})", cell(st, "rests")]) + " |")
    return lines


MIXED = "mixed"


def served_on(r: dict[str, Any]) -> set[int]:
    """The serving thread counts a request's verify steps ran on: its ``threads_steps`` where
    recorded, else the count it started on (older results), else none."""
    if r.get("threads_steps"):
        return {int(n) for n, steps in r["threads_steps"].items() if steps}
    return {r["threads"]} if r.get("threads") is not None else set()


def thread_class(r: dict[str, Any]) -> Any:
    """A request's serving thread count, ``MIXED`` when it moved between counts (its trainer
    started or stopped training mid-request), None when it recorded none."""
    counts = served_on(r)
    if not counts:
        return None
    return counts.pop() if len(counts) == 1 else MIXED


def ratios_by_threads(recs: Iterable[dict[str, Any]],
                      ref_tps: dict[int, float]) -> dict[Any, list[float]]:
    """Per serving thread count (``thread_class``), each request's tokens/s over the reference
    arm's on the same request index (indices the reference lacks skipped)."""
    groups: dict[Any, list[float]] = {}
    for r in recs:
        if ref_tps.get(r["index"]):
            groups.setdefault(thread_class(r), []).append(
                r["tokens_per_s"] / ref_tps[r["index"]])
    return groups


def thread_lines(results: dict[str, Any], block: int = 50) -> list[str]:
    """Per arm whose requests ran on more than one serving thread count (an online arm whose
    trainer shares the cores: serving gives it a thread while it trains), how many of the last
    ``block`` and of all requests ran on each count, and their median per-request ratio to the
    reference arm on the same requests: what the trainer's share of the cores cost serving."""
    recs = results.get("requests") or []
    ref_arm = reference_arm(list(results["arms"]))
    if not recs or ref_arm is None:
        return []
    ref = {r["index"]: r["tokens_per_s"] for r in recs if r["arm"] == ref_arm}
    counts_of: dict[str, set[int]] = {a: set() for a in results["arms"] if a != ref_arm}
    mixed = False
    for r in recs:
        if r["arm"] in counts_of:
            counts_of[r["arm"]] |= served_on(r)
            mixed = mixed or thread_class(r) == MIXED  # the one definition of "mixed"
    shared = [a for a, cs in counts_of.items() if len(cs) > 1]
    if not shared:
        return []
    n = max(r["index"] for r in recs) + 1
    counts: list[Any] = sorted(set().union(*(counts_of[a] for a in shared)), reverse=True)
    heads = [f"on {c} thread(s)" for c in counts]
    if mixed:  # requests whose trainer started or stopped training while they were served
        counts.append(MIXED)
        heads.append("mixed")
    lines = ["", "## Serving threads", "",
             "Per arm whose trainer shares the cores (serving runs on fewer threads while it "
             "trains): requests served on each thread count (mixed: on more than one, the "
             "trainer started or stopped mid-request), and their median per-request "
             f"ratio to `{ref_arm}` on the same requests.", "",
             "| arm | requests | " + " | ".join(heads) + " |",
             "|" + "---|" * (len(counts) + 2)]
    spans = [(f"last {block} ({n - block}-{n - 1})", n - block)] if n > block else []
    for a in shared:
        for label, lo in spans + [(f"all (0-{n - 1})", 0)]:
            groups = ratios_by_threads(
                (r for r in recs if r["arm"] == a and r["index"] >= lo), ref)
            cells = [f"{len(groups[c])} · {fmt_x(median(groups[c]))}" if groups.get(c) else "0"
                     for c in counts]
            lines.append(f"| `{a}` | {label} | " + " | ".join(cells) + " |")
    return lines


def training_periods(recs: Sequence[dict[str, Any]]) -> list[tuple[int, int, Any, Any]]:
    """One arm's training periods, as (first index, last index, version at the start, version
    after): runs of consecutive requests served on fewer threads than the arm's most, for all or
    part of the request (its trainer shares the cores and was training). "After" is the version
    of the next request served on every thread, or of the period's last request when the run
    ended in it."""
    counts = set().union(*(served_on(r) for r in recs))
    if len(counts) < 2:
        return []
    full = max(counts)
    periods: list[tuple[int, int, Any, Any]] = []
    start: dict[str, Any] | None = None
    last: dict[str, Any] | None = None
    for r in sorted(recs, key=lambda r: r["index"]):
        training = min(served_on(r), default=full) < full  # on fewer threads, at least a while
        if training and start is None:
            start = r
        elif not training and start is not None and last is not None:
            periods.append((start["index"], last["index"], start.get("draft_version"),
                            r.get("draft_version")))
            start = None
        last = r
    if start is not None and last is not None:
        periods.append((start["index"], last["index"], start.get("draft_version"),
                        last.get("draft_version")))
    return periods


def _requests_in(periods: list[tuple[int, int, Any, Any]]) -> int:
    return sum(hi - lo + 1 for lo, hi, _, _ in periods)


def training_lines(results: dict[str, Any]) -> list[str]:
    """Per arm whose trainer shares the cores: each training period (the requests served on
    fewer threads) and whether a new version went live by its end. A period that ends on the
    same version cost serving its second thread for nothing the head kept (its candidates did
    not pass the gate; most such periods are probes)."""
    recs = results.get("requests") or []
    rows = []
    for a in results["arms"]:
        periods = training_periods([r for r in recs if r["arm"] == a])
        if not periods:
            continue
        end = max(r["index"] for r in recs if r["arm"] == a)
        closed = [p for p in periods if p[1] < end]  # the run did not end in it
        gained = [p for p in closed if p[2] != p[3]]
        idle = [p for p in closed if p[2] == p[3]]
        listed = ", ".join(f"{lo}-{hi} (v{v0}" + (f"->v{v1}" if v1 != v0 else "")
                           + (", run ended)" if hi == end else ")") for lo, hi, v0, v1 in periods)
        rows.append(f"| `{a}` | {len(gained)} · {_requests_in(gained)} | "
                    f"{len(idle)} · {_requests_in(idle)} | {listed} |")
    if not rows:
        return []
    return ["", "## Training periods", "",
            "Per arm whose trainer shares the cores: periods served on fewer threads while it "
            "trained, with a new version live by their end (periods · requests) and without (a "
            "period the run ended in counts in neither); each period's requests and versions.",
            "",
            "| arm | new version | none | periods |", "|---|---|---|---|", *rows]


def recovery(ys: Sequence[float], target: float, window: int = 20) -> int | None:
    """How many requests of a segment until the mean of the last ``window`` reaches ``target``
    (None: never within the segment)."""
    for i in range(window - 1, len(ys)):
        if statistics.fmean(ys[i - window + 1:i + 1]) >= target:
            return i + 1
    return None


def recovery_lines(results: dict[str, Any], share: float = 0.9, before: int = 50,
                   window: int = 20) -> list[str]:
    """After each domain change of a stream, per drafting arm: tau over the last ``before``
    requests of the segment before, the new segment's mean, and after how many requests the
    mean of ``window`` requests got back to ``share`` of the level before (the head alone's
    in brackets)."""
    recs = results.get("requests") or []
    segments = sorted({r.get("segment") or 0 for r in recs})
    if len(segments) < 2:
        return []
    names = [a for a, v in results["arms"].items() if v.get("tau") is not None and a != "none"]
    lines = ["", "## Recovery after domain changes", "",
             f"Per arm: mean tau over the last {before} requests before the change -> mean over "
             f"the new segment; after how many requests of it the mean of {window} reached "
             f"{share:.0%} of the level before ('-': not within the segment). In brackets: the "
             "learned head alone.", "",
             "| change | " + " | ".join(f"`{a}`" for a in names) + " |",
             "|" + "---|" * (len(names) + 1)]
    by_arm = {a: sorted((r for r in recs if r["arm"] == a), key=lambda r: r["index"])
              for a in names}
    for prev, seg in zip(segments, segments[1:]):
        cells, label = [], ""
        for a in names:
            mine = by_arm[a]
            old = [r for r in mine if (r.get("segment") or 0) == prev][-before:]
            new = [r for r in mine if (r.get("segment") or 0) == seg]
            if not old or not new:
                cells.append("-")
                continue
            label = f"{old[-1].get('domain')} -> {new[0].get('domain')} (at {new[0]['index']})"
            parts = []
            for key in ("tau", "tau_head"):
                ys0 = [r[key] for r in old if r.get(key) is not None]
                ys1 = [r[key] for r in new if r.get(key) is not None]
                if not ys0 or not ys1:
                    continue
                lvl = statistics.fmean(ys0)
                at = recovery(ys1, share * lvl, window)
                parts.append(f"{lvl:.2f} -> {statistics.fmean(ys1):.2f}, "
                             f"{'-' if at is None else at}")
            cells.append(parts[0] + (f" ({parts[1]})" if len(parts) > 1 else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines
