"""The trainer process: its main loop and its message protocol with the serving process.

Started by ``OnlineLearner`` with the ``spawn`` context; the parent sets OMP_NUM_THREADS /
OMP_WAIT_POLICY=PASSIVE in the environment it inherits, so OpenMP is configured before torch is
imported here (two torch processes with spinning OpenMP threads slow each other 5-60x on a
2-core machine, DESIGN.md section 4).

Parent -> trainer (``inbox``): ("traces", payload) | ("live", version) | ("refused", version) |
("rollback", version, head_payload) | ("judge", new_version, previous_version) | ("pause",) |
("resume",) | ("publish_now",) | ("reset", head_payload) | ("stop",).
Trainer -> parent (``outbox``): ("want", max_bytes) | ("candidate", version, path, gate) |
("verdict", version, keep, detail) | ("status", dict) | ("log", level, text).

Traces are pulled: the trainer asks for more only when it has digested the last batch, so a slow
trainer leaves traces in the serving-side byte-bounded buffer (where the oldest are dropped)
instead of an unbounded pipe.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import time
from typing import TYPE_CHECKING, Any

from aurora_spec.memory import peak_rss_mb, started_with_heap_buffers

if TYPE_CHECKING:
    from aurora_spec.flywheel.trainer import Trainer

log = logging.getLogger("aurora_spec.flywheel.worker")


def _lower_priority(spec: dict[str, Any]) -> str:
    """Serving wins whenever the two compete for a core: nice, or the idle scheduling class
    (the trainer runs only on CPU time nobody else wants). Returns what was applied."""
    nice = spec.get("nice") or 0
    if spec.get("idle") and spec.get("device") == "cpu":
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return "SCHED_IDLE"
        except (AttributeError, OSError):  # not Linux: the lowest niceness is the nearest thing
            nice = 19
    if nice:
        try:
            os.nice(nice)
            return f"nice {nice}"
        except OSError:
            pass
    return "normal"


def _judge(trainer: Any, published: dict, new_version: int, previous_version: int) -> dict:
    """The paired verdict on a suspect swap (flywheel/judge.py), as sent to serving."""
    from aurora_spec.flywheel.judge import judge_swap

    new, previous = published.get(new_version), published.get(previous_version)
    if new is None or previous is None:  # e.g. a restarted trainer: serving decides alone
        return {"version": new_version, "keep": None,
                "detail": f"the trainer does not hold versions {new_version} and "
                          f"{previous_version}"}
    return {"version": new_version, **judge_swap(trainer, new, previous).as_dict()}


def trainer_main(spec: dict[str, Any], inbox: Any, outbox: Any) -> None:
    priority = _lower_priority(spec)
    import torch

    torch.set_num_threads(spec["threads"])
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    from aurora_spec.flywheel.checkpoints import head_from_payload
    from aurora_spec.flywheel.losses import Embedder, TargetHead
    from aurora_spec.flywheel.trainer import Trainer

    logging.basicConfig(level=spec.get("log_level", logging.WARNING),
                        format="%(asctime)s %(levelname)s trainer[%(process)d] %(name)s: %(message)s")
    device = torch.device(spec["device"])
    init = head_from_payload(spec["head"])
    target = TargetHead(spec["lm_weight"].to(device), spec["softcap"],
                        spec["norm_scale"].to(device))
    embed = Embedder(spec["embed_weight"].to(device), spec["embed_scale"])
    trainer = Trainer(init, target, embed, spec["trainer_cfg"], device)
    trainer.next_version = max(trainer.next_version, spec["next_version"])
    heap = "heap buffers" if started_with_heap_buffers() else "glibc's buffer defaults"
    log.info("trainer started (pid %d, %d threads, %s, %s, %s)", os.getpid(), spec["threads"],
             device, priority, heap)
    _Worker(spec, trainer, inbox, outbox, priority).run()


class _Worker:
    """The trainer process's loop: drain the parent's messages first (one ``_on_<kind>`` method
    per kind, see the protocol above), then one training step when there is work, a candidate
    every ``publish_every`` steps (``probe_publish_every`` in a probe, Trainer.steps_before_gate),
    and a status now and then."""

    def __init__(self, spec: dict[str, Any], trainer: Trainer, inbox: Any, outbox: Any,
                 priority: str) -> None:
        from aurora_spec.flywheel.checkpoints import CheckpointStore

        self.spec, self.trainer, self.inbox, self.outbox = spec, trainer, inbox, outbox
        self.priority = priority
        self.device = trainer.device
        self.store = CheckpointStore(spec["checkpoint_dir"], spec["keep"])
        self.published = {trainer.live.version: trainer.live}  # versions a verdict may compare
        self.paused = False
        self.pending: tuple[int, Any] | None = None  # (version, head) offered, not yet answered
        self.want_out = False  # asked serving for traces and not answered yet
        self.last_status, self.last_traces = 0.0, time.monotonic()
        self.since_publish, self.force_publish = 0, False
        self.last_verdict: dict | None = None
        self.stopping = False
        # CPU seconds of this process (all its threads) by what they went to: where an idle
        # trainer's share of the machine goes besides optimizer steps.
        self.cpu_s = dict.fromkeys(("steps", "gates", "traces", "verdicts", "other"), 0.0)
        self.cpu0 = time.process_time()

    def _timed(self, kind: str, fn: Any, *args: Any) -> Any:
        t0 = time.process_time()
        try:
            return fn(*args)
        finally:
            self.cpu_s[kind] += time.process_time() - t0

    def run(self) -> None:
        parent = mp.parent_process()
        while not self.stopping:
            if parent is not None and not parent.is_alive():
                return
            if not self.want_out:
                self.outbox.put(("want", self.spec["send_bytes"]))
                self.want_out = True
            busy = not self.paused and not self.trainer.resting and self.trainer.can_train()
            try:
                msg = self.inbox.get(timeout=0.0 if busy else 0.2)
            except queue.Empty:
                msg = None
            if msg is not None:
                kind = {"traces": "traces", "judge": "verdicts"}.get(msg[0], "other")
                self._timed(kind, getattr(self, f"_on_{msg[0]}", self._on_unknown), *msg[1:])
                continue  # drain messages first
            if time.monotonic() - self.last_traces > 1.0 and self.trainer.assembler._open:
                self.trainer.flush()  # traffic paused: close open windows so they can be trained on
            if busy:
                self._timed("steps", self.trainer.train_step)
                self.since_publish += 1
            if (self.pending is None and (busy or self.force_publish)
                    and (self.since_publish >= self.trainer.steps_before_gate
                         or self.force_publish)):
                self._timed("gates", self._offer_candidate)
            if time.monotonic() - self.last_status > 0.5:
                self.send_status()
                self.last_status = time.monotonic()

    def send_status(self) -> None:
        import torch

        st = self.trainer.status()
        st.update(trainer_paused=self.paused, pid=os.getpid(),
                  pending_candidate=None if self.pending is None else self.pending[0],
                  priority=self.priority, trainer_threads=torch.get_num_threads(),
                  heap_buffers=started_with_heap_buffers(),
                  max_rss_mb=peak_rss_mb(),  # what the trainer's memory settings cost
                  last_verdict=self.last_verdict,
                  cpu_s={"total": round(time.process_time() - self.cpu0, 3),
                         **{k: round(v, 3) for k, v in self.cpu_s.items()}})
        self.outbox.put(("status", st))

    def _offer_candidate(self) -> None:
        """The trainer's gate: a candidate that beats the live head goes to serving (saved
        first, so serving loads it from disk); none may send the trainer to rest."""
        self.since_publish, self.force_publish = 0, False
        got = self.trainer.propose_candidate()
        if got is None:
            if self.trainer.maybe_rest():
                self.send_status()  # serving may take the trainer's core now
            return
        cand, res = got
        cand.heldout_alpha = tuple(res.alpha) if res.alpha else None
        cand.heldout_width = self.trainer.score_width if res.alpha else None
        path = self.store.save(cand)
        self.pending = (cand.version, cand)
        self.outbox.put(("candidate", cand.version, str(path),
                         {"candidate": res.candidate, "live": res.live,
                          "positions": res.positions, "alpha": res.alpha,
                          "live_alpha": res.live_alpha
                          if self.trainer.cfg.paired_policy_seed else None}))

    # ---- one method per parent message ----

    def _on_stop(self) -> None:
        self.send_status()
        self.stopping = True

    def _on_traces(self, payload: Any) -> None:
        from aurora_spec.flywheel.traces import unpack

        self.want_out = False
        records = unpack(payload)
        if records:
            self.trainer.ingest(records)
            self.last_traces = time.monotonic()
            if not self.paused and self.trainer.maybe_wake():  # paused: no work at all
                self.send_status()  # serving hands the core back to training now

    def _on_live(self, version: int) -> None:
        if self.pending is not None and self.pending[0] == version:
            self.trainer.set_live(self.pending[1])
            self.published[version] = self.pending[1]
            for v in sorted(self.published)[:-4]:
                del self.published[v]
        self.pending = None

    def _on_refused(self, version: int) -> None:
        self.pending = None

    def _on_rollback(self, version: int, head_payload: Any) -> None:
        from aurora_spec.flywheel.checkpoints import head_from_payload

        head = self.published.get(version) or head_from_payload(head_payload, self.device)
        self.trainer.restart_from(head)
        self.pending = None

    def _on_judge(self, new_version: int, previous_version: int) -> None:
        self.last_verdict = _judge(self.trainer, self.published, new_version, previous_version)
        self.outbox.put(("verdict", new_version, self.last_verdict["keep"],
                         self.last_verdict["detail"]))

    def _on_pause(self) -> None:
        self.paused = True
        self.send_status()  # from now on no candidate is proposed: say so at once

    def _on_resume(self) -> None:
        self.paused = False
        if self.trainer.maybe_wake():
            self.send_status()

    def _on_publish_now(self) -> None:
        self.force_publish = True

    def _on_reset(self, head_payload: Any) -> None:
        from aurora_spec.flywheel.batch import WindowAssembler
        from aurora_spec.flywheel.checkpoints import head_from_payload

        head = head_from_payload(head_payload, self.device)
        self.trainer.store.clear()
        self.trainer.assembler = WindowAssembler(self.trainer.cfg.window)
        self.trainer.restart_from(head)
        self.published = {head.version: self.trainer.live}
        self.pending = None

    def _on_unknown(self, *args: Any) -> None:
        log.warning("trainer: ignoring an unknown message (%d fields)", len(args) + 1)
