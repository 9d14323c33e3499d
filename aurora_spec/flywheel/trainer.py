"""The online trainer: step records in, candidate draft-head versions out.

Runs wherever it is put: in the trainer process (flywheel/worker.py), or in-process for offline
fitting (``aurora train``) and tests. Owns a float32 copy of the head, AdamW, the windows
(recent + replay reservoir + held-out slice) and the draft-vocabulary builder. Two mixins of
Trainer hold the rest: the gate, which offers a candidate only when its offline acceptance on
the held-out slice beats the live version's (flywheel/gating.py), and when to stop stepping and
start again (flywheel/rest.py); the traffic-shift detector is flywheel/shift.py.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from dataclasses import dataclass, field

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from aurora_spec.drafters.eagle3_head import Eagle3Head, carry_rows
from aurora_spec.flywheel.average import WeightAverage
from aurora_spec.flywheel.batch import Window, WindowAssembler, pack_windows
from aurora_spec.flywheel.config import TrainerConfig
from aurora_spec.flywheel.losses import (
    Embedder,
    TargetHead,
    flywheel_loss,
    target_top,
)
from aurora_spec.flywheel.gating import Gating
from aurora_spec.flywheel.replay import WindowStore
from aurora_spec.flywheel.rest import Resting
from aurora_spec.flywheel.traces import TraceRecord
from aurora_spec.flywheel.vocab import DraftIds, VocabBuilder
from aurora_spec.hardware import cpu_native_bf16

log = logging.getLogger(__name__)


def bf16_autocast_ok(device: torch.device) -> bool:
    """bf16 matmuls are native here (CUDA with bf16, or a CPU with AVX512-BF16/AMX): autocast
    speeds training up (measured 1.5x on an AMX CPU); elsewhere it would be emulated and slower
    (2.8x the float32 time on plain AVX-512: aurora_spec/hardware.py)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_native_bf16()


@dataclass
class TrainerStats:
    steps: int = 0
    trained_pairs: int = 0
    loss: float = float("nan")
    accepted_kl: list[float] = field(default_factory=list)
    discard_kl: float = float("nan")
    top1: list[float] = field(default_factory=list)
    step_ms: float = 0.0  # wall time per step (moving average): includes time other processes ran
    step_cpu_ms: float = 0.0  # this process's CPU time per step: the step's cost on a shared machine
    gates: int = 0
    gate_rejections: int = 0
    # judged gates (slice big enough) without progress since the last one with: refused, or
    # passed by less than TrainerConfig.rest_progress
    gates_without_progress: int = 0
    rests: int = 0
    # rests since a gate with progress (less TrainerConfig.probe_progress_rewind for each gate
    # with progress in a probe): each rest lasts twice as long as the one before
    rests_since_pass: int = 0
    wakes: int = 0
    last_wake: str = ""
    wake_kinds: dict[str, int] = field(default_factory=dict)  # served | coverage | held-out | windows
    probe_progress: int = 0  # gates with progress in a probe that probed on (probe_progress_rewind)
    last_gate: dict | None = None
    candidates: int = 0
    target_top_windows: int = 0  # windows whose target top ids were computed (not cached)


class Trainer(Gating, Resting):
    def __init__(self, head: Eagle3Head, target: TargetHead, embed: Embedder,
                 cfg: TrainerConfig | None = None, device: torch.device | str = "cpu") -> None:
        self.cfg = cfg = cfg or TrainerConfig()
        self.device = torch.device(device)
        self.target, self.embed = target, embed
        self.head = copy.deepcopy(head).to(self.device, torch.float32).train()
        self.live = copy.deepcopy(self.head).eval()
        self.next_version = head.version + 1
        self.lr = cfg.lr_trained if cfg.lr_trained is not None and head.version > 0 else cfg.lr
        self.assembler = WindowAssembler(cfg.window)
        self.store = WindowStore(cfg.recent_windows, cfg.reservoir_windows, cfg.holdout_every,
                                 cfg.holdout_windows, cfg.seed, cfg.reservoir_bytes,
                                 unseen_pairs=4 * cfg.gate_positions,
                                 holdout_blocks=cfg.holdout_blocks)
        c = self.head.config
        self.vocab = VocabBuilder(c.target_vocab_size, c.draft_vocab_size,
                                  cfg.vocab_rebuild_coverage, cfg.vocab_min_tokens,
                                  cfg.vocab_coverage_window)
        self.stats = TrainerStats()
        self.draft_ids = DraftIds(c.target_vocab_size)  # Window.target_top across rebuilds
        self.records = 0
        self._init_gate(cfg)
        self._init_rest(cfg)
        torch.manual_seed(cfg.seed)
        self.autocast = cfg.autocast == "bf16" or (cfg.autocast == "auto"
                                                   and bf16_autocast_ok(self.device))
        if cfg.init_from_target and head.version == 0:
            self._init_from_target(torch.ones(c.draft_vocab_size, dtype=torch.bool), norm=True)
        self.average = WeightAverage(self.head, cfg.candidate_ema) if cfg.candidate_ema else None
        self._make_optimizer()
        if cfg.rest_when_trained and cfg.rest_after_rejections and head.version > 0:
            self._start_rest(None)
            log.info("trainer resting from the start: head version %d was trained before serving",
                     head.version)

    @torch.no_grad()
    def _init_from_target(self, rows: torch.Tensor, norm: bool = False) -> None:
        """Start lm_head rows (those in ``rows``) from the target's lm_head rows of the same
        tokens, and -- for a day-0 head -- the final norm gain from the target's: the head's
        output space starts aligned with the target's instead of random. No training data used."""
        w = self.head.lm_head.weight
        idx = self.head.d2t[rows.to(self.head.d2t.device)]
        w[rows.to(w.device)] = self.target.weight[idx.to(self.target.weight.device)].to(w)
        if norm and self.target.norm_scale is not None:
            self.head.norm.weight.copy_(self.target.norm_scale.to(self.head.norm.weight))

    # ---- data ------------------------------------------------------------------------------
    def ingest(self, records: list[TraceRecord]) -> None:
        for rec in records:
            self.records += 1
            self.vocab.observe(rec.tokens[1:], emitted=not rec.prompt)
            if rec.head[0] > 0 and not rec.prompt:
                if rec.version == self.live.version:
                    self._served.append(rec.head[1])
                    self._served_since_rest += 1
                if self.shift.observe(rec.head[1]):
                    self._on_shift()
            for win in self.assembler.add(rec):
                self._add_window(win)
        self._end_shift_when_judged()

    def add_windows(self, windows: list[Window]) -> None:
        for win in windows:
            self._add_window(win)
        self._end_shift_when_judged()

    def _add_window(self, win: Window) -> None:
        self.store.add(win)
        self.fresh.add(win)

    def flush(self) -> None:
        """Close every open window (no more steps are coming soon)."""
        self.add_windows(self.assembler.flush())

    @property
    def coverage(self) -> float:
        return self.vocab.coverage(self.head.t2d)

    def can_train(self) -> bool:
        s = self.store
        return not s.empty and self.stats.trained_pairs < self.cfg.reuse * max(s.positions, 1)

    # ---- training --------------------------------------------------------------------------
    def _make_optimizer(self, keep_state: dict | None = None) -> None:
        c = self.cfg
        # fused: one kernel for all parameters instead of a dozen per tensor (a CPU step 6%
        # faster: scripts/shift_catchup.py speed, 287-295 -> 273-276 ms on 2 threads)
        self.opt = torch.optim.AdamW(self.head.parameters(), lr=self.lr, betas=c.betas,
                                     weight_decay=c.weight_decay, fused=True)
        if keep_state:
            for p in self.head.parameters():
                if p in keep_state:
                    self.opt.state[p] = keep_state[p]

    def maybe_rebuild_vocab(self) -> bool:
        d2t = self.vocab.maybe_rebuild(self.head.t2d)
        if d2t is None:
            return False
        before = self.coverage
        old_w = self.head.lm_head.weight
        old_rows = self.head.t2d[d2t.to(self.head.t2d.device)]  # -1: a token new to the vocab
        old_state = {p: s for p, s in self.opt.state.items() if p is not old_w}
        lm_state = self.opt.state.get(old_w)
        self.head.set_vocab(d2t.to(self.device))
        was_new = old_rows < 0
        if self.cfg.init_from_target and bool(was_new.any()):
            self._init_from_target(was_new)
        if self.average is not None:
            self.average.remap_rows(self.head, old_rows)
        if lm_state:  # kept rows keep their Adam moments: a rebuild must not jolt what was learned
            old_state[self.head.lm_head.weight] = _remap_rows(lm_state, old_rows)
        self._make_optimizer(old_state)
        log.info("draft vocabulary rebuilt (%d tokens, %d of them new): coverage %.3f -> %.3f",
                 len(d2t), int(was_new.sum()), before, self.coverage)
        return True

    def train_step(self) -> float | None:
        """One optimizer step on a batch of newest + replayed windows; None without data."""
        if self.store.empty:
            return None
        c = self.cfg
        self.maybe_rebuild_vocab()
        t0, cpu0 = time.perf_counter(), time.process_time()
        windows = self.store.sample(c.batch_tokens, c.recent_ratio)
        self._cache_target_top(windows)
        batch = pack_windows(windows, with_branches=c.lambda_discard > 0).to(self.device)
        if batch.n_committed == 0 and batch.n_branch == 0:
            return None
        self.head.train()
        with_top1 = self.stats.steps % c.publish_every == 0  # a status stat: now and then
        with self._autocast():
            out = flywheel_loss(self.head, batch, self.target, self.embed, c.depth,
                                c.depth_weights, c.lambda_discard, with_top1=with_top1,
                                loss_vocab=c.loss_vocab, loss_top_k=c.loss_top_k,
                                accepted_width=self.score_width if c.unroll_accepted else 0)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if c.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.head.parameters(), c.grad_clip)
        self.opt.step()
        if self.average is not None:
            self.average.update(self.head)
        s = self.stats
        s.steps += 1
        s.trained_pairs += batch.n_committed
        s.loss = float(out.loss.detach())
        s.accepted_kl, s.discard_kl = out.accepted_kl, out.discard_kl
        if with_top1:
            s.top1 = out.top1
        ms = (time.perf_counter() - t0) * 1e3
        cpu_ms = (time.process_time() - cpu0) * 1e3
        s.step_ms = ms if s.steps == 1 else 0.9 * s.step_ms + 0.1 * ms
        s.step_cpu_ms = cpu_ms if s.steps == 1 else 0.9 * s.step_cpu_ms + 0.1 * cpu_ms
        return s.loss

    @torch.no_grad()
    def _cache_target_top(self, windows: list[Window]) -> None:
        """Give each window the target's top draft ids of its pairs' and branches' targets
        (Window.target_top), which choose a step's loss vocabulary (losses.loss_rows): computed
        once a window and vocabulary, not at every step that replays it (the target's logits
        over the whole draft vocabulary were ~10% of a CPU step); ids cached before a vocabulary
        rebuild are carried over to the new vocabulary (vocab.DraftIds)."""
        c, d2t = self.cfg, self.head.d2t
        if not 0 < c.loss_vocab < len(d2t):
            return
        # A vocabulary other than the last one seen (a rebuild, a rollback to an older version)
        # is one more stamp; ids cached under an older one are carried or recomputed
        stamp = self.draft_ids.follow(d2t)
        for win in windows:
            if win.target_top is not None and win.target_top[0] != stamp:
                ids = self.draft_ids.carry(*win.target_top, win.tokens)
                win.target_top = None if ids is None else (stamp, ids)
            if win.target_top is not None:
                continue
            final = win.target_rows().to(self.device, torch.float32)
            top = target_top(self.target, final, d2t, c.loss_top_k)
            win.target_top = (stamp, top.to("cpu", torch.int32))
            self.stats.target_top_windows += 1

    @contextlib.contextmanager
    def _autocast(self):
        """bf16 autocast where it pays, and on CUDA never cuDNN's attention: it builds a plan for
        every new shape, ~15 ms of CPU a call (every batch here has its own length), which made
        a bf16 step on an H200 396 ms against 18 without autocast (docs/results/gpu.md "On a
        GPU")."""
        attention = (sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                  SDPBackend.MATH])
                     if self.device.type == "cuda" else contextlib.nullcontext())
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast), \
                attention:
            yield

    def set_live(self, head: Eagle3Head) -> None:
        """The gate's baseline becomes ``head`` (after a swap or a rollback)."""
        self.live = copy.deepcopy(head).to(self.device, torch.float32).eval()
        self.next_version = max(self.next_version, head.version + 1)
        self._live_score = None
        self._served.clear()  # served steps of another head say nothing about this one

    def restart_from(self, head: Eagle3Head) -> None:
        """Continue training from ``head``'s weights with a fresh optimizer (after a rollback or a
        reset); the data stays."""
        self.head = copy.deepcopy(head).to(self.device, torch.float32).train()
        for p in self.head.parameters():
            p.requires_grad_(True)
        if self.cfg.init_from_target and head.version == 0:
            self._init_from_target(torch.ones(self.head.config.draft_vocab_size,
                                              dtype=torch.bool), norm=True)
        if self.average is not None:
            self.average.reset(self.head)
        self._make_optimizer()
        self.set_live(head)
        self.fresh.clear()  # a candidate frozen from the weights given up
        self.resting = False  # the live head changed under it: judge afresh
        self.reset_backoff()

    def status(self) -> dict:
        s = self.stats

        def rnd(x: float | None) -> float | None:
            return None if x is None or math.isnan(x) else round(x, 4)

        return {"trainer_step": s.steps, "loss": rnd(s.loss), "accepted_kl": [rnd(x) for x in
                                                                            s.accepted_kl],
                "discard_kl": rnd(s.discard_kl), "top1": [rnd(x) for x in s.top1],
                "step_ms": round(s.step_ms, 1), "step_cpu_ms": round(s.step_cpu_ms, 1),
                "trained_pairs": s.trained_pairs,
                "ingested_pairs": self.store.positions, "records": self.records,
                "windows": len(self.store.reservoir), "holdout_windows": len(self.store.holdout),
                # None until an emitted token is ingested (coverage() reads 1.0 on nothing)
                "vocab_coverage": round(self.coverage, 4) if self.vocab.recent else None,
                "vocab_coverage_unseen": rnd(self.vocab.coverage_since_build(self.head.t2d)),
                "vocab_rebuilds": self.vocab.rebuilds,
                "target_top_windows": s.target_top_windows,
                "gates": s.gates, "gate_rejections": s.gate_rejections,
                "last_gate": s.last_gate, "candidates": s.candidates,
                "resting": self.resting, "rests": s.rests, "wakes": s.wakes,
                "rest_windows": self.rest_windows,
                "served_acceptance": rnd(self.served_acceptance),
                "shifts": self.shift.shifts, "gate_size": self.gate_size(),
                "score_width": self.score_width,
                "last_wake": s.last_wake, "wake_kinds": dict(s.wake_kinds),
                "probe_progress": s.probe_progress,
                "data_bytes": self.store.nbytes}


def _remap_rows(state: dict, old_rows: torch.Tensor) -> dict:
    """AdamW state of an lm_head whose rows were re-chosen: row i of every per-row moment comes
    from old row ``old_rows[i]``; new rows (-1) start at zero, as a fresh optimizer would."""
    return {k: carry_rows(v, old_rows) if torch.is_tensor(v) and v.dim() == 2
            else v  # the step count (a scalar tensor)
            for k, v in state.items()}
