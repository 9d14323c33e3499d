"""EngineLoop: one thread runs the set-up calls and then the step loop (engine/loop.py)."""

from __future__ import annotations

import threading

import pytest

from aurora_spec.engine.loop import EngineLoop


class IdleEngine:
    """Only what the loop reads: no work, a wakeup event."""

    has_work = False

    def __init__(self) -> None:
        self.wakeup = threading.Event()


def test_calls_and_steps_share_one_thread_and_errors_reach_the_caller() -> None:
    loop = EngineLoop()
    first, second = loop.call(threading.get_ident), loop.call(threading.get_ident)
    assert first == second != threading.get_ident()
    with pytest.raises(ValueError, match="bad weights"):
        loop.call(lambda: (_ for _ in ()).throw(ValueError("bad weights")))
    loop.start(IdleEngine())  # type: ignore[arg-type]
    assert loop.alive
    with pytest.raises(RuntimeError, match="stepping"):  # the step loop holds the thread
        loop.call(threading.get_ident)
    loop.stop(timeout=5)
    assert not loop.alive and loop.call(threading.get_ident) == first
    loop.close()
