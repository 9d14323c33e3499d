"""The paired rollback test: after a swap u -> v, when v's live acceptance looks worse than u's,
score both heads offline on the same fresh traffic before rolling back.

Why: serving's live numbers compare v's first drafting steps with u's last ones, i.e. different
requests; a swap at a domain change or onto harder prompts looks like a drop that v did not
cause (measured: v2 was rolled back in the first segment of every shift run, and on the same
requests a rolled-back v3 drafted better than the static head it replaced). Here both heads
draft the windows that arrived since v was frozen (``WindowStore.unseen``: neither trained on
them) and v is rolled back only when it does worse there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aurora_spec.drafters.eagle3_head import Eagle3Head
    from aurora_spec.flywheel.trainer import Trainer


@dataclass(frozen=True)
class Verdict:
    keep: bool | None  # None: too little fresh traffic to judge (serving decides on its own)
    new: float  # mean accepted draft tokens per draft point of the new head
    previous: float
    positions: int  # draft points both were scored on

    @property
    def detail(self) -> str:
        if self.keep is None:
            return f"too little fresh traffic to compare ({self.positions} positions)"
        return (f"on {self.positions} fresh positions the new head drafts {self.new:.3f} "
                f"tokens per point, the previous {self.previous:.3f}")

    def as_dict(self) -> dict:
        return {"keep": self.keep, "new": round(self.new, 4),
                "previous": round(self.previous, 4), "positions": self.positions,
                "detail": self.detail}


def judge_swap(trainer: Trainer, new: Eagle3Head, previous: Eagle3Head) -> Verdict:
    """Score ``new`` and ``previous`` on the windows no published head has trained on; keep the
    new one unless it does worse by more than the gate's margin (a tie keeps it: it has seen
    more traffic). Why the margin: the gate published ``new`` for beating ``previous`` by it;
    measured verdicts rolled back on 0.638 vs 0.641 and 0.272 vs 0.280 tokens per point on
    ~600 positions, differences well inside the noise of so few."""
    windows = list(trainer.store.unseen)
    new_acc, n = trainer.offline_acceptance(new, windows)
    prev_acc, _ = trainer.offline_acceptance(previous, windows)
    if n < trainer.cfg.gate_min_positions:
        return Verdict(None, new_acc, prev_acc, n)
    return Verdict(new_acc >= prev_acc - trainer.cfg.gate_margin, new_acc, prev_acc, n)
