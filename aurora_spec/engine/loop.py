"""The serving process's torch thread: loads the model, calibrates, then steps the Engine.

Why one thread for all of it: torch runs CPU kernels on an OpenMP team of the calling thread. A
server that loaded the model on its main thread and decoded on another had two teams; libgomp
then manages more threads than the cores and makes every team sleep at its barriers instead of
spinning (aurora_spec/threads.py), and decoding ran ~30% slower with the CPUs partly idle
(scripts/openmp_teams.py). So the server does its torch work here, in order:

    loop = EngineLoop()
    runtime = loop.call(build_runtime, ...)   # load + calibrate on the engine thread
    loop.start(runtime.engine)                # step while there is work, sleep when idle
    ...
    loop.stop(); loop.close()
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from aurora_spec.engine.engine import Engine
from aurora_spec.threads import name_os_thread

log = logging.getLogger(__name__)
T = TypeVar("T")
_CLOSE = object()


class EngineLoop:
    def __init__(self, name: str = "aurora-engine") -> None:
        self.engine: Engine | None = None
        self.steps = 0
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._idle = threading.Event()  # cleared by start() until the step loop has ended
        self._idle.set()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the engine thread; return its result or raise its exception here.
        Not while the engine steps: the step loop holds the thread until stop()."""
        if not self._idle.is_set():
            raise RuntimeError("the engine thread is stepping: call() before start() or "
                               "after stop()")
        fut: Future[T] = Future()
        self._jobs.put((functools.partial(fn, *args, **kwargs), fut))
        return fut.result()

    def start(self, engine: Engine) -> EngineLoop:
        self.engine = engine
        self._stop.clear()
        self._idle.clear()
        self._jobs.put((self._run, None))
        return self

    def stop(self, timeout: float | None = None) -> None:
        """End the step loop (the thread stays for call() until close())."""
        self._stop.set()
        if self.engine is not None:
            self.engine.wakeup.set()
        self._idle.wait(timeout)

    def close(self) -> None:
        self._jobs.put((_CLOSE, None))

    @property
    def alive(self) -> bool:
        """The engine is being stepped (the /health answer)."""
        return not self._idle.is_set() and self._thread.is_alive()

    def _serve(self) -> None:
        name_os_thread(self._thread.name)  # its OpenMP workers inherit it: top -H, py-spy
        while True:
            fn, fut = self._jobs.get()
            if fn is _CLOSE:
                return
            if fut is None:
                fn()
            elif fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:  # handed to the caller of call()
                    fut.set_exception(e)

    def _run(self) -> None:
        engine = self.engine
        assert engine is not None
        try:
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
        finally:
            self._idle.set()
