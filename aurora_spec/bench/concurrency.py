"""Concurrency sweep (``aurora bench --concurrency 1,2,4,8``): closed-loop clients on one engine.

At level c, c requests are in flight at all times (a finished one is replaced at once) until every
request of the plan is served; the engine batches them (continuous batching). Per arm and level:
aggregate tokens/s over the wall time, time to first token, time per output token (p50/p99).
Every (level, arm) gets a fresh engine and drafter, so no arm learns the prompts at one level and
replays them at the next; arms alternate order between levels (interleaved).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aurora_spec.bench.figures import percentile
from aurora_spec.types import SamplingParams


@dataclass
class _Timing:
    submitted: float
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    done: bool = False
    tau: float = 1.0


@dataclass
class LevelResult:
    timings: list[_Timing] = field(default_factory=list)
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        done = [t for t in self.timings if t.first is not None]
        ttft = [t.first - t.submitted for t in done]  # type: ignore[operator]
        tpot = [(t.last - t.first) / (t.tokens - 1) for t in done  # type: ignore[operator]
                if t.tokens > 1]
        total = sum(t.tokens for t in self.timings)

        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 4)

        return {
            "aggregate_tokens_per_s": r(total / self.wall_s if self.wall_s else None),
            "ttft_p50_s": r(percentile(ttft, 50)), "ttft_p99_s": r(percentile(ttft, 99)),
            "tpot_p50_s": r(percentile(tpot, 50)), "tpot_p99_s": r(percentile(tpot, 99)),
            "tau": r(sum(t.tau for t in done) / len(done) if done else None),
            "requests": len(self.timings), "tokens": total, "wall_s": r(self.wall_s),
        }


def closed_loop(engine: Any, prompts: Sequence[list[int]], level: int, max_tokens: int,
                stop_ids: tuple[int, ...]) -> LevelResult:
    """Serve ``prompts`` with ``level`` requests in flight; the engine steps on this thread."""
    params = SamplingParams(max_tokens=max_tokens, stop_token_ids=stop_ids)
    queue = deque(prompts)
    out = LevelResult()

    def submit() -> None:
        timing = _Timing(time.perf_counter())
        out.timings.append(timing)

        def on_update(seq: Any, new: list[int]) -> None:
            now = time.perf_counter()
            if new:
                timing.first = timing.first or now
                timing.last = now
                timing.tokens += len(new)
            if seq.finished:
                timing.done = True
                timing.tau = seq.stats.tau

        engine.add_request(list(queue.popleft()), params, on_update=on_update)

    start = time.perf_counter()
    for _ in range(min(level, len(queue))):
        submit()
    while engine.has_work:
        engine.step()
        in_flight = sum(not t.done for t in out.timings)
        while queue and in_flight < level:
            submit()
            in_flight += 1
    out.wall_s = time.perf_counter() - start
    return out


def run_concurrency(build_engine: Any, arm_names: Sequence[str], prompts: Sequence[list[int]],
                    levels: Sequence[int], max_tokens: int, stop_ids: tuple[int, ...],
                    progress: bool = True) -> dict[str, dict[str, Any]]:
    """``build_engine(arm_name, max_slots) -> Engine``. Returns {level: {arm: summary}}."""
    from tqdm import tqdm

    results: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=len(levels) * len(arm_names), desc="concurrency", disable=not progress)
    for i, level in enumerate(levels):
        order = list(arm_names[i % len(arm_names):]) + list(arm_names[:i % len(arm_names)])
        row: dict[str, Any] = {}
        for name in order:
            engine = build_engine(name, level)
            closed_loop(engine, prompts[:level], level, min(max_tokens, 16), stop_ids)  # warm-up
            res = closed_loop(engine, prompts, level, max_tokens, stop_ids)
            row[name] = res.summary()
            bar.update(1)
            bar.set_postfix_str(f"c={level} {name} "
                                f"{row[name]['aggregate_tokens_per_s'] or 0:.1f} tok/s")
        results[str(level)] = {name: row[name] for name in arm_names}
    bar.close()
    return results


def concurrency_checks(conc: dict[str, dict[str, Any]], reference: str = "none") -> list[str]:
    """The issue-5 figures as PASS/FAIL lines: c=4 speculative aggregate >= 2x its c=1 aggregate
    and >= 1.3x target-only at c=4; speculation never > 5% slower than target-only."""
    lines = []

    def agg(level: str, arm: str) -> float | None:
        return conc.get(level, {}).get(arm, {}).get("aggregate_tokens_per_s")

    for arm in next(iter(conc.values()), {}):
        if arm == reference:
            continue
        c1, c4, base4 = agg("1", arm), agg("4", arm), agg("4", reference)
        if c1 and c4:
            lines.append(_line(f"{arm}: c=4 aggregate / c=1 aggregate", c4 / c1, 2.0))
        if c4 and base4:
            lines.append(_line(f"{arm}: c=4 aggregate / {reference} c=4", c4 / base4, 1.3))
        for level in conc:
            a, b = agg(level, arm), agg(level, reference)
            if a and b:
                lines.append(_line(f"{arm}: c={level} vs {reference}", a / b, 0.95))
    return lines


def _line(name: str, value: float, threshold: float) -> str:
    return f"{'PASS' if value >= threshold else 'FAIL'} {name} = {value:.2f}x (target >= {threshold}x)"


def render_concurrency(results: dict[str, Any]) -> str:
    conc = results["concurrency"]
    arms = list(next(iter(conc.values()), {}))
    lines = [f"# aurora bench: concurrency sweep\n\n`{results['config']['command']}`\n",
             "| concurrency | arm | aggregate tokens/s | vs none | TTFT p50 s | TPOT p50 s | "
             "TPOT p99 s | tau |", "|---|---|---|---|---|---|---|---|"]
    for level, row in conc.items():
        base = row.get("none", {}).get("aggregate_tokens_per_s")
        for arm in arms:
            s = row[arm]
            agg = s["aggregate_tokens_per_s"]
            vs = f"{agg / base:.2f}x" if agg and base else "n/a"
            lines.append(f"| {level} | {arm} | {agg} | {vs} | {s['ttft_p50_s']} | "
                         f"{s['tpot_p50_s']} | {s['tpot_p99_s']} | {s['tau']} |")
    lines += ["", *[f"- {c}" for c in results.get("checks_concurrency", [])], ""]
    return "\n".join(lines)
