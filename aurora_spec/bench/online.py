"""Online-learning arms for ``aurora bench``: ``online`` (day 0: random head) and
``online-from:DIR`` (start from trained weights), each an eagle3 engine with an OnlineLearner.

Fairness: every arm gets the same machine. The trainer process runs only while its own arm
serves (paused otherwise, so it never steals cores from the other arms' requests), and during
those requests serving and training split the thread budget as in ``aurora serve``
(``LearnerConfig.trainer_idle``, auto unless an ``@idle`` or ``@share`` suffix says): a sharing
trainer (the default for ``online``, a day-0 head) takes 1 thread while it trains and serving gets
``threads - 1``, at least 1 (every thread while the trainer rests, see TrainerConfig.rest_*); an
idle-class trainer (the default for ``online-from``, a trained head) runs under SCHED_IDLE:
serving keeps every thread and the trainer learns on the CPU time serving leaves.

Load (``--load``, ArmOptions.load): by default requests come back to back, a server at 100%
utilisation, so an idle-class trainer learns only on the scraps serving leaves. Below 1, each
request of an online arm is followed by the idle time a server at that utilisation would have,
(1/load - 1) x the request's wall time, with the trainer running and serving idle; tokens/s still
counts decode time only. Other arms have no use for idle time and skip it (it would change
nothing but the wall clock).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from aurora_spec.bench.arms import (
    ArmOptions,
    ArmOutput,
    BenchTarget,
    EngineArm,
    engine_arm,
    register_arm,
)


class OnlineArm(EngineArm):
    """An engine arm whose learner trains while it serves. The trainer process starts at the
    arm's first request, not when the arm is built: a spawning trainer (imports, ~1 CPU-second)
    would otherwise overlap the next arm's load-time kernel timings and bias its choices."""

    def __init__(self, inner: EngineArm, learner: Any, load: float = 1.0) -> None:
        super().__init__(inner.name, inner.kind, inner.engine, inner.stop_ids)
        self.learner = learner
        self.load = load

    def run(self, prompt_ids: list[int], max_tokens: int, domain: str | None,
            request_id: str) -> ArmOutput:
        self.learner.start()  # the first request's; a no-op afterwards
        outer = torch.get_num_threads()
        threads = self.learner.serving_threads() or outer
        torch.set_num_threads(threads)
        self.learner.resume()
        try:
            t0 = time.perf_counter()
            out = super().run(prompt_ids, max_tokens, domain, request_id)
            if self.load < 1.0:  # the idle time after this request: only the trainer runs
                time.sleep((time.perf_counter() - t0) * (1.0 / self.load - 1.0))
            return dataclasses.replace(out, threads=threads,
                                       trainer=trainer_counters(self.learner.status()))
        finally:
            self.learner.pause()
            torch.set_num_threads(outer)

    def status(self) -> dict[str, Any]:
        return {**self.learner.status(), **super().status()}

    def close(self) -> None:
        self.learner.stop(save=False)


def trainer_counters(status: dict[str, Any]) -> dict[str, Any] | None:
    """What a request's record keeps of the learner's status: the trainer's optimizer steps,
    gates judged and refused, and the last gate's scores, so a run's results show when gates
    ran and why versions did or did not go live, request by request (the final status alone
    says only how many). None before the trainer's first status."""
    if "trainer_step" not in status:
        return None
    gate = status.get("last_gate") or {}
    return {"steps": status["trainer_step"], "gates": status.get("gates", 0),
            "refused": status.get("gate_rejections", 0),
            "last_gate": {k: gate[k] for k in ("passed", "candidate", "live", "positions")
                          if k in gate} or None}


def _build(target: BenchTarget, name: str, weights: str | None, o: ArmOptions,
           lambda_discard: float | None = None) -> OnlineArm:
    from aurora_spec.flywheel.config import LearnerConfig, TraceConfig, TrainerConfig
    from aurora_spec.flywheel.learner import OnlineLearner

    inner = engine_arm(target, name, "online", "eagle3", weights, o)
    over = dict(o.trainer_config)  # the arm's suffixes (absent: TrainerConfig's default)
    if lambda_discard is not None:
        over["lambda_discard"] = lambda_discard
    learner = OnlineLearner(target.model, inner.engine,
                            LearnerConfig(trace=TraceConfig(**dict(o.trace_config)),
                                          trainer=TrainerConfig(**over),
                                          trainer_threads=o.trainer_threads,
                                          trainer_idle=o.trainer_idle,
                                          trainer_rests=o.trainer_rests,
                                          rollback_paired=o.rollback_paired,
                                          omp_passive=not o.trainer_spin,
                                          trainer_heap_buffers=o.trainer_heap_buffers))
    return OnlineArm(inner, learner, o.load)


def _build_online(t: BenchTarget, name: str, arg: str | None, o: ArmOptions) -> OnlineArm:
    """``online`` or ``online:LAMBDA`` (lambda_discard for the ablation)."""
    return _build(t, name, None, o, float(arg) if arg else None)


def _build_online_from(t: BenchTarget, name: str, arg: str | None, o: ArmOptions) -> OnlineArm:
    if not arg:
        from aurora_spec.bench.arms import BenchError

        raise BenchError("arm 'online-from' needs a head directory: online-from:DIR")
    return _build(t, name, arg, o)


register_arm("online", _build_online)
register_arm("online-from", _build_online_from)
