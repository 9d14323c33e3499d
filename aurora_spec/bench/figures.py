"""Numbers and their text for benchmark reports: medians, means, ratios and percentiles that
tolerate missing values (None), and how report.md writes them."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]), None for no values."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def rounded(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


def stats_of(recs: list[dict[str, Any]]) -> dict[str, Any]:
    tps = [r["tokens_per_s"] for r in recs if r.get("tokens_per_s") is not None]
    taus = [r["tau"] for r in recs if r.get("tau") is not None]
    return {"tokens_per_s": median(tps), "tau": mean(taus), "requests": len(recs)}


def fmt_x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def fmt_f(v: float | None, nd: int = 1) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"
