"""What the gate's scoring costs, on recorded traffic: the accepted-chains unroll the gate uses
(``losses.acceptance_lengths``) against the full unroll it replaced, on the newest ~512 scored
positions of each domain of a ``shift_catchup.py collect`` file (one gate slice), alternating
rounds; it also checks that both give the same scores (docs/results/trainer.md, "Unrolling only the
chains serving would have accepted").

    python scripts/gate_cost.py runs/catchup-cs/traces.pt [--init runs/head-chat] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import shift_catchup as sc
from aurora_spec.flywheel import scoring
from aurora_spec.flywheel.gating import newest_windows
from aurora_spec.flywheel.losses import acceptance_lengths, unrolled_forward


@torch.no_grad()
def full_unroll_lengths(head, batch, embed, depth: int, width: int = 1) -> torch.Tensor:
    """The measure as it was before e91764d: every depth at every pair, then each chain walked
    along its successors."""
    un = unrolled_forward(head, batch, embed, depth, with_branches=False)
    d2t, truth, nc = head.d2t, batch.truth_c, batch.n_committed
    correct = [(d2t[lg.argmax(-1)] == truth) & v for lg, v in zip(un.logits, un.valid)]
    top = d2t[un.logits[0].topk(min(width, un.logits[0].shape[-1]), dim=-1).indices]
    correct[0] = (top == truth[:, None]).any(-1)
    nxt = torch.full((nc,), -1, dtype=torch.long)
    has = batch.prev_c >= 0
    nxt[batch.prev_c[has]] = torch.arange(nc)[has]
    run, idx = correct[0].clone(), torch.arange(nc)
    total = run.long()
    for d in range(1, depth):
        idx = torch.where(idx >= 0, nxt[idx.clamp(min=0)], idx)
        run = run & (idx >= 0) & correct[d][idx.clamp(min=0)]
        total += run.long()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("traces")
    ap.add_argument("--init", default=None, help="trained head (default: a random day-0 head)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--width", type=int, default=3, help="tree width scored (serving's: 3)")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    a.device, a.gate = "cpu", True
    a.trainer = json.dumps({"score_width": a.width})
    trainer = sc._trainer(a)
    data = torch.load(a.traces, weights_only=False)
    for domain, _ in sc._stream(data["stream"]):
        windows = newest_windows(sc._held_windows(sc._requests(data["records"][domain], 0)),
                                 trainer.cfg.gate_positions)
        ms: dict[str, list[int]] = {"full": [], "accepted": []}
        scores = {}
        for _ in range(a.rounds):
            for name, fn in (("full", full_unroll_lengths), ("accepted", acceptance_lengths)):
                scoring.acceptance_lengths = fn  # what score_windows calls
                t = time.perf_counter()
                s = trainer.score(trainer.head, windows)
                ms[name].append(round(1000 * (time.perf_counter() - t)))
                scores[name] = s
        f, g = scores["full"], scores["accepted"]
        same = (f.mean, f.points, f.alpha) == (g.mean, g.points, g.alpha) and torch.equal(
            f.per_window, g.per_window)
        print(json.dumps({"domain": domain, "positions": g.points, "mean": round(g.mean, 4),
                          "full_ms": ms["full"], "accepted_ms": ms["accepted"],
                          "same_scores": same}))
    scoring.acceptance_lengths = acceptance_lengths


if __name__ == "__main__":
    main()
