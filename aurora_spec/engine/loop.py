"""Runs an Engine on its own thread: steps while there is work, sleeps when idle."""

from __future__ import annotations

import logging
import threading

from aurora_spec.engine.engine import Engine

log = logging.getLogger(__name__)


class EngineLoop:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="aurora-engine", daemon=True)
        self.steps = 0

    def start(self) -> EngineLoop:
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        self.engine.wakeup.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        engine = self.engine
        while not self._stop.is_set():
            if not engine.has_work:
                engine.wakeup.wait(timeout=0.5)
                engine.wakeup.clear()
                continue
            try:
                engine.step()
                self.steps += 1
            except Exception:  # a bug in one step must not kill serving: fail those requests
                log.exception("engine step failed; aborting running requests")
                engine.fail_running()
