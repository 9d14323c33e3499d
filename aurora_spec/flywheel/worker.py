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
from typing import Any


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
    from aurora_spec.flywheel.batch import WindowAssembler
    from aurora_spec.flywheel.checkpoints import CheckpointStore, head_from_payload
    from aurora_spec.flywheel.losses import Embedder, TargetHead
    from aurora_spec.flywheel.traces import unpack
    from aurora_spec.flywheel.trainer import Trainer

    logging.basicConfig(level=spec.get("log_level", logging.WARNING),
                        format="%(asctime)s %(levelname)s trainer[%(process)d] %(name)s: %(message)s")
    log = logging.getLogger("aurora_spec.flywheel.worker")
    device = torch.device(spec["device"])
    init = head_from_payload(spec["head"])
    target = TargetHead(spec["lm_weight"].to(device), spec["softcap"],
                        spec["norm_scale"].to(device))
    embed = Embedder(spec["embed_weight"].to(device), spec["embed_scale"])
    trainer = Trainer(init, target, embed, spec["trainer_cfg"], device)
    trainer.next_version = max(trainer.next_version, spec["next_version"])
    store = CheckpointStore(spec["checkpoint_dir"], spec["keep"])
    published = {init.version: trainer.live}
    parent = mp.parent_process()
    paused, pending, want_out = False, None, False
    publish_every = spec["trainer_cfg"].publish_every
    last_status, last_traces, since_publish = 0.0, time.monotonic(), 0
    force_publish = False
    last_verdict: dict | None = None
    log.info("trainer started (pid %d, %d threads, %s, %s)", os.getpid(), spec["threads"], device,
             priority)

    def send_status() -> None:
        st = trainer.status()
        st.update(trainer_paused=paused, pid=os.getpid(),
                  pending_candidate=None if pending is None else pending[0], priority=priority,
                  trainer_threads=torch.get_num_threads(), last_verdict=last_verdict)
        outbox.put(("status", st))

    while True:
        if parent is not None and not parent.is_alive():
            return
        if not want_out:
            outbox.put(("want", spec["send_bytes"]))
            want_out = True
        busy = not paused and not trainer.resting and trainer.can_train()
        try:
            msg = inbox.get(timeout=0.0 if busy else 0.2)
        except queue.Empty:
            msg = None
        if msg is not None:
            kind = msg[0]
            if kind == "stop":
                send_status()
                return
            if kind == "traces":
                want_out = False
                records = unpack(msg[1])
                if records:
                    trainer.ingest(records)
                    last_traces = time.monotonic()
                    if not paused and trainer.maybe_wake():  # paused: no work at all
                        send_status()  # serving hands the core back to training now
            elif kind == "live":
                if pending is not None and pending[0] == msg[1]:
                    trainer.set_live(pending[1])
                    published[msg[1]] = pending[1]
                    for v in sorted(published)[:-4]:
                        del published[v]
                pending = None
            elif kind == "refused":
                pending = None
            elif kind == "rollback":  # ("rollback", version, head_payload)
                head = published.get(msg[1]) or head_from_payload(msg[2], device)
                trainer.restart_from(head)
                pending = None
            elif kind == "judge":  # ("judge", new_version, previous_version)
                last_verdict = _judge(trainer, published, msg[1], msg[2])
                outbox.put(("verdict", msg[1], last_verdict["keep"], last_verdict["detail"]))
            elif kind == "pause":
                paused = True
                send_status()  # from now on no candidate is proposed: say so at once
            elif kind == "resume":
                paused = False
                if trainer.maybe_wake():
                    send_status()
            elif kind == "publish_now":
                force_publish = True
            elif kind == "reset":
                head = head_from_payload(msg[1], device)
                trainer.store.clear()
                trainer.assembler = WindowAssembler(trainer.cfg.window)
                trainer.restart_from(head)
                published = {head.version: trainer.live}
                pending = None
            continue  # drain messages first
        if time.monotonic() - last_traces > 1.0 and trainer.assembler._open:
            trainer.flush()  # traffic paused: close open windows so they can be trained on
        if busy:
            trainer.train_step()
            since_publish += 1
        if (pending is None and (since_publish >= publish_every or force_publish)
                and (busy or force_publish)):
            since_publish, force_publish = 0, False
            got = trainer.propose_candidate()
            if got is None and trainer.maybe_rest():
                send_status()  # serving may take the trainer's core now
            if got is not None:
                cand, res = got
                cand.heldout_alpha = tuple(res.alpha) if res.alpha else None
                path = store.save(cand)
                pending = (cand.version, cand)
                outbox.put(("candidate", cand.version, str(path),
                            {"candidate": res.candidate, "live": res.live,
                             "positions": res.positions, "alpha": res.alpha}))
        if time.monotonic() - last_status > 0.5:
            send_status()
            last_status = time.monotonic()
