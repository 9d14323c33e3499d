"""OnlineLearner: the Learner (flywheel/api.py) that makes the draft head learn from live traffic.

    learner = OnlineLearner(model, drafter_or_engine, LearnerConfig())
    engine = Engine(runner, drafter, cfg, trace_sink=learner.trace_sink)   # or attach() sets it
    learner.attach(engine); learner.start(); ... ; learner.stop()

Serving process side: ``trace_sink`` (engine thread) copies each verify step into a compact
record in a byte-bounded buffer and updates live acceptance by version -- nothing else. A bridge
thread hands buffered traces to the trainer process when it asks, offers its candidates to the
``Publisher`` (load, validate, swap between engine steps, roll back) and restarts the trainer
process if it dies (watchdog): serving keeps its live version meanwhile.
Trainer process side: flywheel/worker.py. Mode ``static`` records and reports but never trains.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
import tempfile
import threading
import time
from typing import Any

import torch

from aurora_spec.flywheel.checkpoints import CheckpointStore, check_fits, head_to_payload
from aurora_spec.flywheel.config import LearnerConfig
from aurora_spec.flywheel.publisher import Publisher
from aurora_spec.flywheel.trainer_process import TrainerProcess
from aurora_spec.flywheel.traces import TraceBuffer, pack, record_prefill, record_step
from aurora_spec.memory import HEAP_BUFFERS_ENV
from aurora_spec.threads import name_os_thread, single_thread_kernels
from aurora_spec.types import PrefillTrace, StepTrace

log = logging.getLogger(__name__)


class OnlineLearner:
    """``model``: the target DecoderModel (its lm_head and embedding are shared read-only with the
    trainer); ``drafter_or_engine``: the Eagle3Drafter serving uses, or the Engine holding it
    (then attach() is implied); ``config``: LearnerConfig."""

    def __init__(self, model: Any, drafter_or_engine: Any = None,
                 config: LearnerConfig | None = None) -> None:
        self.model = model
        self.cfg = cfg = config or LearnerConfig()
        self.engine: Any = None
        self.drafter: Any = None
        self.buffer = TraceBuffer(cfg.trace.buffer_bytes)
        self._dtype = cfg.trace.torch_dtype
        self._max_rejected = cfg.trace.max_rejected if cfg.trainer.lambda_discard > 0 else 0
        self.publisher: Publisher | None = None
        self.store: CheckpointStore | None = None
        self._tmpdir: str | None = None
        self._proc: TrainerProcess | None = None
        self._bridge: threading.Thread | None = None
        self._stopping = threading.Event()
        self._want = 0
        self._trainer_status: dict = {}
        self._initial: Any = None
        self.recorded = 0
        self.sink_errors = 0
        self.trainer_restarts = 0
        self.paused = False
        self._started = False
        self._cores = 0  # serving threads when start() ran: what serving and training share
        self.trainer_idle = False  # cfg.trainer_idle resolved by start() (None: auto)
        if drafter_or_engine is not None:
            if hasattr(drafter_or_engine, "call_between_steps"):
                self.attach(drafter_or_engine)
            else:
                self._bind_drafter(drafter_or_engine)

    # ---- wiring -------------------------------------------------------------------------------
    def _bind_drafter(self, drafter: Any) -> None:
        if drafter is None or not hasattr(drafter, "swap_head"):
            raise ValueError("online learning needs an eagle3 drafter (one with swap_head)")
        check_fits(drafter.head, self.model)
        self.drafter = drafter
        if self._initial is None:
            self._initial = copy.deepcopy(drafter.head)
        if self.publisher is None:
            c = self.cfg
            self.publisher = Publisher(drafter, self.engine, self.model, None,
                                       c.rollback_min_steps, c.rollback_drop, c.rollback_min_gap,
                                       on_change=self._on_change,
                                       judge=self._ask_verdict if c.rollback_paired else None,
                                       verdict_steps=c.rollback_verdict_steps)
        self.publisher.engine = self.engine

    def attach(self, engine: Any) -> None:
        self.engine = engine
        self._bind_drafter(engine.drafter if engine.drafter is not None else self.drafter)
        if getattr(engine, "trace_sink", None) is None:
            engine.trace_sink = self.trace_sink
        if getattr(engine, "prefill_sink", None) is None:
            engine.prefill_sink = self.prefill_sink

    # ---- Learner protocol ---------------------------------------------------------------------
    def trace_sink(self, trace: StepTrace) -> None:
        try:
            if self.publisher is not None:
                # The head's own part (eagle3 + lookup: not what the lookup chain copied).
                drafted, accepted = trace.policy_part or (len(trace.proposal),
                                                          trace.result.num_accepted)
                self.publisher.observe(trace.proposal.draft_version, drafted, accepted)
            if self.cfg.mode == "online":
                self.buffer.append(record_step(trace, self._dtype, self._max_rejected))
                self.recorded += 1
        except Exception:  # recording must never break serving
            self.sink_errors += 1
            if self.sink_errors == 1:
                log.exception("trace recording failed (further failures are counted only)")

    def prefill_sink(self, trace: PrefillTrace) -> None:
        """A prompt's positions as training data (engine thread; never raises)."""
        if self.cfg.mode != "online" or self.cfg.trace.prompt_rows <= 0:
            return
        try:
            self.buffer.append(record_prefill(trace, self._dtype, self.cfg.trace.prompt_rows,
                                              self.live_version))
            self.recorded += 1
        except Exception:  # recording must never break serving
            self.sink_errors += 1
            if self.sink_errors == 1:
                log.exception("prompt trace recording failed (further failures are counted only)")

    def start(self) -> None:
        if self._started:
            return
        if self.publisher is None:
            raise RuntimeError("attach an engine (or pass a drafter) before start()")
        c = self.cfg
        self._cores = torch.get_num_threads()
        if c.mode == "static":
            self._started = True
            return
        root = c.checkpoint_dir or tempfile.mkdtemp(prefix="aurora-flywheel-")
        self._tmpdir = None if c.checkpoint_dir else root
        self.store = CheckpointStore(root, c.keep_checkpoints)
        self.publisher.store = self.store
        if c.checkpoint_dir and c.resume:
            self.resume_from_checkpoints()
        self.trainer_idle = self._want_idle_trainer()
        lm = self.model.lm_head.weight.detach()
        emb = self.model.embed.weight.detach()
        lm_shared = lm.to("cpu", torch.float32).clone()
        norm = self.model.norm
        self._shared = {"lm_weight": lm_shared,
                        "norm_scale": (norm.weight.detach().float() + norm.offset).cpu().clone(),
                        "embed_weight": lm_shared if emb is lm else
                        emb.to("cpu", torch.float32).clone()}
        self._stopping.clear()
        self._spawn()
        self._bridge = threading.Thread(target=self._bridge_loop, name="aurora-flywheel",
                                        daemon=True)
        self._bridge.start()
        self._started = True
        self._share_cores()

    def stop(self, save: bool = True) -> None:
        self._stopping.set()
        if self.engine is not None and self.serving_threads() is not None:
            cores = self._cores  # serving gets the trainer's core back
            self.engine.call_between_steps(lambda: torch.set_num_threads(cores))
        if self._bridge is not None:
            self._bridge.join(timeout=10)
            self._bridge = None
        self._stop_proc()
        if save and self.cfg.checkpoint_dir and self.store is not None and self.publisher:
            live = self.publisher.live
            try:
                self.store.save(live)
                self.store.mark_live(live.version)
            except OSError as e:
                log.warning("cannot save the live draft to %s: %s", self.store.root, e)
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
        self._started = False

    def status(self) -> dict[str, Any]:
        st: dict[str, Any] = {"learning": self.cfg.mode == "online" and self._started,
                              "mode": self.cfg.mode}
        st.update(self._trainer_status)
        if self.publisher is not None:
            st.update(self.publisher.status())
        st.update(buffer_fill=round(self.buffer.fill, 4), buffer_bytes=self.buffer.bytes,
                  dropped_traces=self.buffer.dropped, recorded_traces=self.recorded,
                  trainer_alive=bool(self._proc is not None and self._proc.alive()),
                  trainer_pid=self.trainer_pid, trainer_restarts=self.trainer_restarts,
                  trainer_idle=self.trainer_idle, trainer_rests=self.trainer_rests,
                  paused=self.paused, sink_errors=self.sink_errors)
        return st

    def pause(self) -> None:
        self.paused = True
        self._send(("pause",))

    def resume(self) -> None:
        self.paused = False
        self._send(("resume",))

    def swap_now(self) -> bool:
        """Ask the trainer to gate and publish its current weights now (the gate still applies)."""
        return self._send(("publish_now",))

    def rollback(self) -> bool:
        return bool(self.publisher and self.publisher.rollback("requested"))

    def reset(self) -> None:
        """Back to the head serving started with; the trainer forgets its data and weights."""
        if self.publisher is None or self._initial is None:
            return
        head = copy.deepcopy(self._initial)
        self.publisher.swap(head, watch=False, reason="reset")
        self.buffer.clear()

    # ---- extras -------------------------------------------------------------------------------
    def resume_from_checkpoints(self) -> int | None:
        """Serve the newest valid checkpoint of ``checkpoint_dir`` (corrupt or incompatible ones
        are refused with a log line); returns its version, None when there is none."""
        if self.publisher is None or not self.cfg.checkpoint_dir:
            return None
        if self.store is None:
            self.store = CheckpointStore(self.cfg.checkpoint_dir, self.cfg.keep_checkpoints)
            self.publisher.store = self.store
        w = self.drafter.head.fc.weight
        head = self.store.newest_valid(self.model, w.device, w.dtype)
        if head is None:
            return None
        if head.version != self.drafter.head.version:
            log.info("resuming from checkpoint version %d", head.version)
            self.publisher.swap(head.eval(), watch=False, reason="resume")
        return head.version

    @property
    def trainer_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def trainer_resting(self) -> bool:
        """The trainer found nothing more to learn and stopped stepping (TrainerConfig.rest_*):
        its core is free for serving until new evidence wakes it."""
        return bool(self._trainer_status.get("resting"))

    def serving_threads(self) -> int | None:
        """Torch threads serving should use now (None: not the learner's business): the cores
        it started with, less the trainer's threads while a CPU trainer is training (an idle-class
        trainer, ``trainer_idle``, takes only what serving leaves: serving keeps them all)."""
        c = self.cfg
        if not (c.share_cores and self._started and c.mode == "online" and self._cores):
            return None
        if self._trainer_device() != "cpu" or self.trainer_resting or self.trainer_idle:
            return self._cores
        return max(1, self._cores - self.trainer_threads)

    @property
    def trainer_threads(self) -> int:
        """``cfg.trainer_threads``, or when None (auto): all of serving's threads for an
        idle-class CPU trainer (it runs only when serving leaves them), else one."""
        if self.cfg.trainer_threads is not None:
            return self.cfg.trainer_threads
        idle_cpu = self.trainer_idle and self._trainer_device() == "cpu"
        return max(1, self._cores) if idle_cpu else 1

    def _apply_serving_threads(self) -> None:
        """Engine thread, between steps: follow the trainer's state (torch's thread setting is
        per calling thread for OpenMP, so it must be made by the thread that runs the model)."""
        n = self.serving_threads()
        if n is not None and n != torch.get_num_threads():
            torch.set_num_threads(n)

    def _share_cores(self) -> None:
        if self.engine is not None and self.serving_threads() is not None:
            self.engine.call_between_steps(self._apply_serving_threads)

    def _want_idle_trainer(self) -> bool:
        """``cfg.trainer_idle``, or when None (auto): idle from a trained head, where serving
        on every thread beat a sharing trainer (docs/bench/HISTORY.md, stream-shift-v4), sharing from
        a day-0 head, which learns fast only on a core of its own (an idle trainer made ~4% of
        the sharing one's steps there)."""
        if self.cfg.trainer_idle is not None:
            return self.cfg.trainer_idle
        return self.live_version > 0

    @property
    def trainer_rests(self) -> bool:
        """``cfg.trainer_rests``, or when None (auto): every trainer but an idle-class CPU one."""
        if self.cfg.trainer_rests is not None:
            return self.cfg.trainer_rests
        return not (self.trainer_idle and self._trainer_device() == "cpu")

    def _trainer_device(self) -> str:
        device = self.cfg.trainer_device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return device

    @property
    def live_version(self) -> int:
        return self.publisher.live_version if self.publisher else 0

    def wait_for(self, predicate, timeout: float = 30.0, poll: float = 0.05) -> bool:
        """Poll ``predicate(status())`` until true or timeout (tests, benchmarks)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate(self.status()):
                return True
            time.sleep(poll)
        return bool(predicate(self.status()))

    @property
    def head_tree_width(self) -> int:
        """Siblings the learned head drafts at depth 1 (a hybrid's lookup branch is not its)."""
        learned = getattr(self.drafter, "learned", self.drafter)
        return max(int(getattr(learned, "tree_width", 1)), 1)

    # ---- trainer process ----------------------------------------------------------------------
    def _spawn(self) -> None:
        c = self.cfg
        self._want = 0
        assert self.publisher is not None and self.store is not None
        live = self.publisher.live
        threads = self.trainer_threads
        # A trainer that does not rest: TrainerConfig's "0: never rest".
        trainer_cfg = (c.trainer if self.trainer_rests else
                       dataclasses.replace(c.trainer, rest_after_rejections=0))
        if not trainer_cfg.score_width:  # score the trees serving drafts
            trainer_cfg = dataclasses.replace(trainer_cfg, score_width=self.head_tree_width)
        spec = {"head": head_to_payload(live), "threads": threads,
                "device": self._trainer_device(),
                "trainer_cfg": trainer_cfg, "softcap": self.model.spec.final_logit_softcap,
                "embed_scale": float(self.model.spec.embed_scale),
                "checkpoint_dir": str(self.store.root), "keep": c.keep_checkpoints,
                "next_version": max(self.store.max_version(), live.version) + 1,
                "send_bytes": c.send_bytes, "nice": c.trainer_nice, "idle": self.trainer_idle,
                # the package's level, not the root's: `aurora serve` sets only the former
                "log_level": logging.getLogger("aurora_spec").getEffectiveLevel(),
                **self._shared}
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        if c.omp_passive:
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        if c.trainer_heap_buffers:
            env.update(HEAP_BUFFERS_ENV)
        self._proc = TrainerProcess(spec, env)

    def _stop_proc(self) -> None:
        if self._proc is not None:
            self._proc.stop()
            self._proc = None

    def _send(self, msg: tuple) -> bool:
        return self._proc is not None and self._proc.send(msg)

    def _on_change(self, reason: str, head: Any) -> None:
        """The publisher changed the live head: tell the trainer (its gate baseline)."""
        if reason.startswith("rollback"):
            self._send(("rollback", head.version, head_to_payload(head)))
        elif reason == "reset":
            self._send(("reset", head_to_payload(head)))

    def _ask_verdict(self, new_version: int, previous_version: int) -> bool:
        """Engine thread: ask the trainer to judge a suspect swap (flywheel/judge.py)."""
        return self._send(("judge", new_version, previous_version))

    def _bridge_loop(self) -> None:
        # Its kernels (packing trace rows, preparing a new head) stay on this thread: a team of
        # its own would slow serving's (aurora_spec/threads.py).
        single_thread_kernels()
        name_os_thread("aurora-flywheel")
        next_check = time.monotonic()
        while not self._stopping.is_set():
            proc = self._proc
            msg = proc.receive(timeout=0.05) if proc is not None else None
            if msg is not None:
                self._handle(msg)
            if self._want and len(self.buffer):
                records = self.buffer.drain(self._want)
                self._want = 0
                self._send(("traces", pack(records)))
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + self.cfg.watchdog_s
                self._watchdog()

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "want":
            self._want = int(msg[1])
        elif kind == "status":
            resting = self.trainer_resting
            self._trainer_status = msg[1]
            if self.trainer_resting != resting:
                self._share_cores()
        elif kind == "candidate":
            _, version, path, gate = msg
            assert self.publisher is not None
            head = self.publisher.offer(path, gate.get("alpha") or None,
                                        gate.get("live_alpha") or None)
            if head is not None:
                log.info("version %d live (held-out acceptance %.3f vs %.3f)", version,
                         gate["candidate"], gate["live"])
                self._send(("live", version))
            else:
                self._send(("refused", version))
        elif kind == "verdict":  # ("verdict", version, keep, detail)
            assert self.publisher is not None
            self.publisher.verdict(msg[1], msg[2], msg[3])

    def _watchdog(self) -> None:
        proc = self._proc
        if proc is None or proc.alive() or self._stopping.is_set():
            return
        self.trainer_restarts += 1
        log.warning("trainer process %d died (exit code %s); serving stays on version %d; "
                    "restarting the trainer", proc.pid, proc.exitcode, self.live_version)
        proc.close()
        self._trainer_status = {}
        self._share_cores()
        time.sleep(min(self.cfg.restart_backoff_s * self.trainer_restarts, 30.0))
        if not self._stopping.is_set():
            self._spawn()
            if self.paused:
                self._send(("pause",))
