"""The benchmark's PNG: tau and tokens/s against request index, one line per arm, stream segment
boundaries and draft-version swaps marked (``aurora bench`` writes it as bench.png)."""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def swap_indices(recs: list[dict[str, Any]]) -> list[int]:
    """Request indices where an arm's draft version changed. Only requests that drafted say which
    head was live: one that never drafted reports version 0 and would mark two false swaps."""
    versions = [(r["index"], r.get("draft_version")) for r in recs if r.get("proposed", 1)]
    return [i1 for (_, v0), (i1, v1) in zip(versions, versions[1:])
            if v0 is not None and v1 is not None and v1 != v0]


def _rolling(ys: Sequence[float], w: int = 10) -> list[float]:
    """Mean of the last ``w`` values at each point (the plots' smoothed line)."""
    return [statistics.fmean(ys[max(0, i - w + 1):i + 1]) for i in range(len(ys))]


def plot_requests(results: dict[str, Any], path: Path) -> None:
    """tau and tokens/s against request index, one line per arm; stream segment boundaries and
    draft version changes (swaps) marked."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = results["requests"]
    fig, (ax_tau, ax_tps) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    for k, name in enumerate(results["arms"]):
        color = colors[k % len(colors)]
        mine = sorted((r for r in recs if r["arm"] == name), key=lambda r: r["index"])
        for ax, key in ((ax_tau, "tau"), (ax_tps, "tokens_per_s")):
            pts = [(r["index"], r[key]) for r in mine if r.get(key) is not None]
            if not pts:
                continue
            xs, ys = zip(*pts)
            many = len(xs) >= 20
            ax.plot(xs, ys, color=color, alpha=0.3 if many else 0.9, lw=1,
                    marker=None if many else "o", ms=3, label=None if many else name)
            if many:
                ax.plot(xs, _rolling(ys), color=color, lw=2, label=name)
        head = [(r["index"], r["tau_head"]) for r in mine if r.get("tau_head") is not None]
        if len(head) >= 20:  # eagle3 + lookup: what the learned head alone would have reached
            xs, ys = zip(*head)
            ax_tau.plot(xs, _rolling(ys), color=color, lw=1.5, ls="--",
                        label=f"{name}: head alone")
            ax_tau.legend(loc="upper left", fontsize=8)
        for i in swap_indices(mine):
            for ax in (ax_tau, ax_tps):
                ax.axvline(i, color="grey", ls=":", lw=0.8)
    if results["config"].get("mode") == "stream":
        by_index = {r["index"]: r for r in recs}
        prev = None
        for i in sorted(by_index):
            seg = by_index[i].get("segment")
            if seg != prev:
                for ax in (ax_tau, ax_tps):
                    if prev is not None:
                        ax.axvline(i - 0.5, color="black", ls="--", lw=0.8)
                ax_tau.annotate(by_index[i]["domain"], (i, 1), xycoords=("data", "axes fraction"),
                                va="top", fontsize=8)
                prev = seg
    ax_tau.set_ylabel("tau (tokens / verify step)")
    ax_tps.set_ylabel("decode tokens/s")
    ax_tps.set_xlabel("request index")
    ax_tps.legend(loc="best", fontsize=8)
    cfg = results["config"]
    fig.suptitle(f"{cfg.get('model')} {cfg.get('dtype')}, {cfg.get('threads')} thread(s), "
                 f"{cfg.get('max_tokens')} max new tokens", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
