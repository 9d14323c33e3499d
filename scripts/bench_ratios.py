"""Each arm of a stream bench against its static arm after the first shift, three ways: the
report's ratio of median tokens/s, the ratio of mean per-request tokens/s, and the ratio of total
decode tokens over total decode time; plus the medians of each arm's priced verify cost of a
one-depth draft over a one-token step and of a two-depth draft over a one-depth one (policy
snapshots, where they record it; ~1.0 when drafting is priced as measured on this CPU) and how
many outputs differ from the static arm's; each arm's mean tau and how often its policy's best
length at a request's start was 0, 1, 2 ...; and each arm's median decode step (decode time over
tokens / tau) beside what its policy priced a step of 0, 1 and 2 depths at the requests' end
(verify plus drafting).
Usage: python scripts/bench_ratios.py RUN_DIR/results.json [--from 50] [--to N]."""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("results")
    ap.add_argument("--from", dest="start", type=int, default=50, help="first request counted")
    ap.add_argument("--to", dest="stop", type=int, default=None,
                    help="first request not counted (default: none)")
    ap.add_argument("--base", default=None, help="arm to compare with (default: the static arm)")
    a = ap.parse_args()
    d = json.load(open(a.results))
    arms = d["config"]["arms"]
    stop = float("inf") if a.stop is None else a.stop
    reqs = {arm: [r for r in d["requests"] if r["arm"] == arm and a.start <= r["index"] < stop]
            for arm in arms}
    ref = a.base or next(arm for arm in arms if arm.startswith("static"))

    def figures(rs: list[dict]) -> tuple[float, float, float]:
        tps = [r["tokens_per_s"] for r in rs]
        total = sum(r["decode_tokens"] for r in rs) / sum(r["decode_s"] for r in rs)
        return statistics.median(tps), statistics.mean(tps), total

    base = figures(reqs[ref])
    ref_by_index = {r["index"]: r for r in reqs[ref]}
    for arm in arms:
        rs = reqs[arm]
        med, mean, total = figures(rs)
        costs = [r["policy"]["start"]["verify_ms"] for r in rs if r.get("policy")]
        priced = statistics.median(c[1] / c[0] for c in costs) if costs else float("nan")
        deeper = [c[2] / c[1] for c in costs if len(c) > 2]
        priced2 = statistics.median(deeper) if deeper else float("nan")
        print(json.dumps({"arm": arm, "requests": len(rs),
                          "median_ratio": round(med / base[0], 3),
                          "mean_ratio": round(mean / base[1], 3),
                          "total_ratio": round(total / base[2], 3),
                          "priced_draft_verify": round(priced, 3),
                          "priced_depth2_depth1": round(priced2, 3),
                          "tau": round(statistics.mean(r["tau"] for r in rs), 2),
                          "best_length_at_start": dict(sorted(Counter(
                              r["policy"]["start"]["best_length"] for r in rs
                              if r.get("policy")).items())),
                          "median_step_ms": round(statistics.median(
                              r["decode_s"] * 1e3 * r["tau"] / r["decode_tokens"] for r in rs), 1),
                          "priced_step_ms": priced_steps(rs),
                          "outputs_differ": sum(r["token_ids_sha1"]
                                                != ref_by_index[r["index"]]["token_ids_sha1"]
                                                for r in rs),
                          "per_request_by_threads": by_threads(rs, ref_by_index)}))


def priced_steps(rs: list[dict]) -> list[float]:
    """Median priced step of 0, 1 and 2 depths (verify plus drafting) at the requests' end."""
    ends = [r["policy"]["end"] for r in rs if r.get("policy")]
    return [round(statistics.median(e["verify_ms"][k] + k * e["draft_ms"] for e in ends), 1)
            for k in range(3) if ends and all(len(e["verify_ms"]) > k for e in ends)]


def by_threads(rs: list[dict], ref_by_index: dict[int, dict]) -> dict[str, dict[str, float]]:
    """Median per-request ratio to the base arm, per number of serving threads."""
    from aurora_spec.bench.stream_report import ratios_by_threads

    ref_tps = {i: r["tokens_per_s"] for i, r in ref_by_index.items()}
    groups = {("?" if t is None else str(t)): v
              for t, v in ratios_by_threads(rs, ref_tps).items()}
    return {t: {"requests": len(v), "median_ratio": round(statistics.median(v), 3)}
            for t, v in sorted(groups.items())}


if __name__ == "__main__":
    main()
