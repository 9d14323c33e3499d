"""The trainer's OS process as serving sees it: start it from a spec, send it messages, read its
replies, stop it. What the messages mean is the learner's business (flywheel/learner.py) and the
worker's (flywheel/worker.py); this module only owns the process and its two queues.

Spawned, not forked: the child starts clean of serving's threads and OpenMP state, and reads its
thread settings (OMP_NUM_THREADS, OMP_WAIT_POLICY, ...) from the environment at exec.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Iterator
from typing import Any

import torch

log = logging.getLogger(__name__)
_ENV_LOCK = threading.Lock()  # os.environ is process-wide: one spawn edits it at a time


@contextlib.contextmanager
def _child_env(**env: str) -> Iterator[None]:
    """Environment a spawned child inherits (read at exec), restored afterwards."""
    with _ENV_LOCK:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


class TrainerProcess:
    """A running trainer: ``spec`` is what flywheel/worker.py's ``trainer_main`` starts from,
    ``env`` the environment variables its process reads at start."""

    def __init__(self, spec: dict[str, Any], env: dict[str, str]) -> None:
        from aurora_spec.flywheel.worker import trainer_main

        ctx = torch.multiprocessing.get_context("spawn")
        self._inbox, self._outbox = ctx.Queue(), ctx.Queue()
        self._proc = ctx.Process(target=trainer_main, args=(spec, self._inbox, self._outbox),
                                 name="aurora-trainer", daemon=True)
        with _child_env(**env):
            self._proc.start()
        log.info("trainer process %d started", self._proc.pid)

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    @property
    def exitcode(self) -> int | None:
        return self._proc.exitcode

    def alive(self) -> bool:
        return self._proc.is_alive()

    def send(self, msg: tuple) -> bool:
        """Queue ``msg`` for the trainer; False when it is not running (nothing is queued)."""
        if not self._proc.is_alive():
            return False
        self._inbox.put(msg)
        return True

    def receive(self, timeout: float) -> tuple | None:
        """The trainer's next message, None after ``timeout`` seconds or once the queue is gone."""
        try:
            return self._outbox.get(timeout=timeout)
        except (queue.Empty, OSError, EOFError, ValueError):
            return None

    def stop(self, timeout: float = 5.0) -> None:
        """Ask it to stop, kill it if it does not within ``timeout`` seconds, free the queues."""
        self.send(("stop",))
        self._proc.join(timeout=timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=timeout)
        self.close()

    def close(self) -> None:
        """Free the queues without waiting for their feeder threads (a dead child reads none)."""
        for q in (self._inbox, self._outbox):
            q.cancel_join_thread()
            q.close()
