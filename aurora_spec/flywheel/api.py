"""The seam between serving and online learning.

The server and the benchmark only talk to a ``Learner``: they hand it every verify step's trace
(non-blocking) and ask it for status and admin actions. ``NullLearner`` is serving with a fixed
draft (``--no-learn``); the online learner lives in ``aurora_spec.flywheel.learner``.
"""

from __future__ import annotations

from typing import Any, Protocol

from aurora_spec.types import PrefillTrace, StepTrace


class Learner(Protocol):
    def attach(self, engine: Any) -> None:
        """Bind to the serving engine (its drafter is where new versions are swapped in, between
        engine steps, through ``engine.call_between_steps``)."""

    def start(self) -> None:
        """Start training in the background (its own process)."""

    def stop(self, save: bool = True) -> None:
        """Stop training; with ``save`` persist the live draft."""

    def trace_sink(self, trace: StepTrace) -> None:
        """Called on the engine thread after each verify step; must never block serving."""

    def prefill_sink(self, trace: PrefillTrace) -> None:
        """Called on the engine thread after each prompt's prefill; must never block serving."""

    def status(self) -> dict[str, Any]:
        """Numbers for /health, /metrics and the live page: live_version, trainer_step, loss,
        buffer_fill, dropped_traces, swaps, rollbacks, vocab_coverage, paused, ..."""

    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def swap_now(self) -> bool: ...
    def rollback(self) -> bool: ...
    def reset(self) -> None: ...


class NullLearner:
    """Serving with a fixed draft: traces are dropped, admin actions do nothing."""

    def __init__(self) -> None:
        self.engine: Any = None

    def attach(self, engine: Any) -> None:
        self.engine = engine

    def start(self) -> None:
        pass

    def stop(self, save: bool = True) -> None:
        pass

    def trace_sink(self, trace: StepTrace) -> None:
        pass

    def prefill_sink(self, trace: PrefillTrace) -> None:
        pass

    def status(self) -> dict[str, Any]:
        drafter = getattr(self.engine, "drafter", None)
        head = getattr(drafter, "head", None)
        return {"learning": False, "live_version": getattr(head, "version", 0)}

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def swap_now(self) -> bool:
        return False

    def rollback(self) -> bool:
        return False

    def reset(self) -> None:
        pass
