"""The engine: token ids in, token ids out, one speculative step at a time.

One engine step = admit -> (per running request) draft -> verify -> accept/commit -> emit traces.
Requests join and leave between steps; a step advances every running request once, so concurrent
requests interleave and none waits for another to finish. ``add_request``/``abort``/
``call_between_steps`` are thread-safe; everything else runs on the engine's own thread.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from aurora_spec.drafters.base import Drafter
from aurora_spec.drafters.policy import CostModel, DraftLengthPolicy, PolicyConfig
from aurora_spec.engine.sampling import make_generator, processed_probs, sample
from aurora_spec.engine.verify import verify_greedy, verify_sampling
from aurora_spec.models.runner import TargetRunner, VerifyItem
from aurora_spec.models.transformer import ForwardOutput
from aurora_spec.types import (
    GenerationResult,
    GenerationStats,
    InvalidRequestError,
    PrefillTrace,
    Proposal,
    SamplingParams,
    StepTrace,
    VerifyResult,
)

EMPTY = Proposal()
TraceSink = Callable[[StepTrace], None]
PrefillSink = Callable[[PrefillTrace], None]


@dataclass(frozen=True)
class EngineConfig:
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    calibrate: bool = True  # time target forwards of 1..max_draft+1 tokens at start-up


@dataclass(eq=False)
class Sequence:
    """One request's mutable state inside the engine."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    domain: str | None = None
    record_traces: bool = True
    on_update: Callable[[Sequence, list[int]], None] | None = None
    output: list[int] = field(default_factory=list)
    stats: GenerationStats = field(default_factory=GenerationStats)
    finish_reason: str | None = None
    slot: int = -1
    generator: torch.Generator | None = None
    policy: DraftLengthPolicy | None = None
    started_at: float = 0.0

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def result(self) -> GenerationResult:
        return GenerationResult(tuple(self.output), self.finish_reason or "abort", self.stats,
                                len(self.prompt_ids))


def _policy(seq: Sequence) -> DraftLengthPolicy:
    """The request's draft-length policy, made at prefill (so set for every running sequence)."""
    assert seq.policy is not None
    return seq.policy


class Engine:
    def __init__(self, runner: TargetRunner, drafter: Drafter | None,
                 cfg: EngineConfig = EngineConfig(), trace_sink: TraceSink | None = None) -> None:
        self.runner = runner
        self.drafter = drafter
        self.cfg = cfg
        self.trace_sink = trace_sink
        # Prompt positions as training data (the learner sets it); same opt-out as trace_sink.
        self.prefill_sink: PrefillSink | None = None
        self.costs = CostModel()
        prior = getattr(drafter, "prior_acceptance", None)
        policy_cfg = cfg.policy if prior is None else replace(cfg.policy, prior_alpha=prior)
        width = int(getattr(drafter, "tree_width", 1) or 1)
        if width != policy_cfg.tree_width:  # the policy prices a draft by the nodes it verifies
            policy_cfg = replace(policy_cfg, tree_width=width)
        self.policy = DraftLengthPolicy(policy_cfg, self.costs)  # global acceptance estimates
        # A drafter with free nodes (drafters/hybrid.py: a lookup chain beside the head) is
        # asked every step, up to the request's limit, and reports the part the policy sized.
        self._free_depth = bool(getattr(drafter, "free_depth", False))
        self._drafter_policy_part = getattr(drafter, "policy_part", None)
        self._inbox: queue.SimpleQueue[Sequence] = queue.SimpleQueue()
        self._actions: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._aborts: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._ids = itertools.count()
        self.wakeup = threading.Event()  # set whenever work arrives from another thread
        if cfg.calibrate:
            self.calibrate()

    # ----- thread-safe entry points -------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams,
                    request_id: str | None = None, domain: str | None = None,
                    record_traces: bool = True,
                    on_update: Callable[[Sequence, list[int]], None] | None = None) -> Sequence:
        """Queue a request; ``on_update(seq, new_tokens)`` is called from the engine thread after
        each step that emitted tokens and once more when the request finishes."""
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty")
        if len(prompt_ids) >= self.runner.capacity:
            raise InvalidRequestError(f"the prompt has {len(prompt_ids)} tokens; the context "
                                      f"window holds {self.runner.capacity}")
        seq = Sequence(request_id or f"req-{next(self._ids)}", list(prompt_ids), params, domain,
                       record_traces, on_update)
        self._inbox.put(seq)
        self.wakeup.set()
        return seq

    def abort(self, request_id: str) -> None:
        self._aborts.put(request_id)
        self.wakeup.set()

    def call_between_steps(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the engine thread before the next step (e.g. a draft swap)."""
        self._actions.put(fn)
        self.wakeup.set()

    # ----- engine thread ---------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting or not self._inbox.empty()
                    or not self._actions.empty() or not self._aborts.empty())

    def step(self) -> None:
        """Advance every running request by one verify step (admitting new ones first)."""
        self._drain_control()
        self._admit()
        for seq in [s for s in self.running if self.runner.length(s.slot) + 1 >= self.runner.capacity]:
            seq.finish_reason = "length"  # the context window is full
            self._retire(seq)
        if not self.running:
            return
        # Costs are learnt per thread count: the learner moves serving between one and two
        # threads as its trainer takes or gives back a core.
        threads = self.costs.condition = torch.get_num_threads()
        seqs = list(self.running)
        for seq in seqs:
            by = seq.stats.steps_by_threads
            by[threads] = by.get(threads, 0) + 1
        proposals = self._draft(seqs)
        t0 = time.perf_counter()
        outs = self.runner.verify_batch([VerifyItem(seq.slot, seq.output[-1], prop)
                                         for seq, prop in zip(seqs, proposals, strict=True)])
        results = [self._verify(seq, prop, out) for seq, prop, out in zip(seqs, proposals, outs,
                                                                          strict=True)]
        tokens = sum(len(p) + 1 for p in proposals)
        self.costs.observe_verify(tokens, time.perf_counter() - t0, batch=len(seqs))
        for seq, prop, out, res in zip(seqs, proposals, outs, results, strict=True):
            self._after_verify(seq, prop, out, res)
            if seq.finished:
                self._retire(seq)

    def generate(self, prompt_ids: list[int], params: SamplingParams, **kw) -> GenerationResult:
        """Run one request to completion on the calling thread (CLI, tests, benchmarks)."""
        seq = self.add_request(prompt_ids, params, **kw)
        while not seq.finished:
            self.step()
        return seq.result()

    def fail_running(self) -> None:
        """After an unexpected error: end every running request (finish_reason "error")."""
        for seq in list(self.running):
            seq.finish_reason = "error"
            self._retire(seq)

    def _drain_control(self) -> None:
        while not self._actions.empty():
            self._actions.get()()
        while not self._inbox.empty():
            self.waiting.append(self._inbox.get())
        while not self._aborts.empty():
            rid = self._aborts.get()
            for seq in list(self.running) + list(self.waiting):
                if seq.request_id == rid and not seq.finished:
                    seq.finish_reason = "abort"
                    self._retire(seq)

    def _admit(self) -> None:
        while self.waiting and self.runner.free_slots:
            seq = self.waiting.popleft()
            if seq.finished:  # aborted while waiting
                continue
            seq.slot = self.runner.allocate()
            self.running.append(seq)
            self._prefill(seq)
            if seq.finished:
                self._retire(seq)

    def _retire(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq.slot >= 0:
            self.runner.release(seq.slot)
            if self.drafter is not None:
                self.drafter.finish(seq.request_id, seq.tokens)
            seq.slot = -1
        seq.stats.decode_s = time.perf_counter() - seq.started_at if seq.started_at else 0.0
        if seq.policy is not None and self.drafter is not None:
            seq.stats.policy_end = seq.policy.snapshot().as_dict()
            seq.policy.finish()  # the request's acceptance moves the global estimates
        if seq.on_update is not None:
            seq.on_update(seq, [])

    def _prefill(self, seq: Sequence) -> None:
        t0 = time.perf_counter()
        seq.generator = None if seq.params.greedy else make_generator(
            seq.params.seed, self.runner.device)
        seq.policy = DraftLengthPolicy(self.policy.cfg, self.costs, parent=self.policy)
        if self.drafter is not None:
            seq.stats.policy_start = seq.policy.snapshot().as_dict()
        out = self.runner.prefill(seq.slot, seq.prompt_ids)
        first = self._pick(out.logits[0, -1], seq)
        if self.drafter is not None:
            self.drafter.start(seq.request_id, seq.prompt_ids, first, out.fused_hidden[0])
        if self.prefill_sink is not None and seq.record_traces:
            self.prefill_sink(PrefillTrace(seq.request_id, tuple(seq.prompt_ids), first,
                                           out.fused_hidden[0], out.final_hidden[0], seq.domain))
        seq.started_at = time.perf_counter()
        seq.stats.prefill_s = seq.started_at - t0
        self._emit(seq, [first])

    def _pick(self, logits: torch.Tensor, seq: Sequence) -> int:
        if seq.params.greedy:
            return int(logits.argmax())
        assert seq.generator is not None  # made at prefill whenever sampling is not greedy
        return int(sample(processed_probs(logits, seq.params), seq.generator))

    def _draft_limit(self, seq: Sequence) -> int:
        remaining = seq.params.max_tokens - len(seq.output)
        room = self.runner.capacity - self.runner.length(seq.slot) - 1
        return min(remaining - 1, (room - 1) // self.policy.cfg.tree_width,
                   self.cfg.policy.max_draft)

    def _plan(self, seqs: list[Sequence]) -> list[int]:
        """Draft length per request: each request's own best length, then (for a batch) a common
        cap chosen so the batch's expected tokens per second is highest: verification stops
        being nearly free once the batch is large (measured by the cost model)."""
        if self.drafter is None:
            return [0] * len(seqs)
        wants = [_policy(seq).choose(self._draft_limit(seq)) for seq in seqs]
        if len(seqs) == 1 or self.cfg.policy.fixed_draft is not None or not any(wants):
            return wants
        c, batch = self.costs.draft_time(), len(seqs)
        best_cap, best_rate = 0, 0.0
        for cap in range(max(wants) + 1):
            ks = [min(w, cap) for w in wants]
            tokens = sum(_policy(seq).expected_tokens(k)
                         for seq, k in zip(seqs, ks, strict=True))
            nodes = self.policy.cfg.tree_width * sum(ks)
            rate = tokens / (self.costs.verify_time(nodes + batch, batch) + c * sum(ks))
            if rate > best_rate:
                best_cap, best_rate = cap, rate
        for seq, want in zip(seqs, wants, strict=True):
            if want > best_cap:
                _policy(seq).capped(best_cap)
        return [min(w, best_cap) for w in wants]

    def _draft(self, seqs: list[Sequence]) -> list[Proposal]:
        proposals = []
        free = self._free_depth  # the policy's k sizes only the drafter's costly part
        for seq, k in zip(seqs, self._plan(seqs), strict=True):
            limit = self._draft_limit(seq) if free else 0
            if not k and limit <= 0:
                proposals.append(EMPTY)
                continue
            t0 = time.perf_counter()
            d: Any = self.drafter
            prop = (d.propose(seq.request_id, seq.tokens, k, seq.params, limit=limit) if free
                    else d.propose(seq.request_id, seq.tokens, k, seq.params))
            # A drafter that defers work (eagle3 catches up skipped steps) says how much it did;
            # a long backlog is a one-off cost, not what each drafted token costs.
            if getattr(d, "last_catch_up", 0) <= self.cfg.policy.max_draft + 1:
                depth, _ = self._policy_part(seq, prop, None)  # siblings share one head step
                # A drafter with free nodes times its costly part (the policy sizes only that).
                costly = getattr(d, "last_costly_s", None) if free else None
                seconds = time.perf_counter() - t0 if costly is None else costly
                self.costs.observe_draft(depth, seconds)
            proposals.append(prop)
        return proposals

    def _policy_part(self, seq: Sequence, prop: Proposal,
                     result: VerifyResult | None) -> tuple[int, int]:
        """(depth, accepted) of the part of ``prop`` the policy sized: all of it, unless the
        drafter adds free nodes and reports its costly part itself (``policy_part``)."""
        if self._drafter_policy_part is not None:
            return self._drafter_policy_part(seq.request_id, result)
        return max(prop.depths(), default=0), result.num_accepted if result else 0

    def _verify(self, seq: Sequence, proposal: Proposal, out: ForwardOutput) -> VerifyResult:
        logits = out.logits[0]
        if seq.params.greedy:
            result = verify_greedy(proposal, logits)
        else:
            assert seq.generator is not None  # made at prefill whenever sampling is not greedy
            result = verify_sampling(proposal, processed_probs(logits, seq.params), seq.generator)
        self.runner.commit(seq.slot, result.accepted_nodes)
        return result

    def _after_verify(self, seq: Sequence, proposal: Proposal, out: ForwardOutput,
                      result: VerifyResult) -> None:
        part = self._policy_part(seq, proposal, result) if len(proposal) else (0, 0)
        if len(proposal):
            _policy(seq).observe(*part)
        trace = StepTrace(seq.request_id, self.runner.length(seq.slot) - 1 - result.num_accepted,
                          seq.output[-1], proposal, result, out.fused_hidden[0],
                          out.final_hidden[0], seq.domain, part)
        if self.drafter is not None:
            self.drafter.observe(trace)
        if self.trace_sink is not None and seq.record_traces:
            self.trace_sink(trace)
        emitted = self._emit(seq, list(result.emitted))
        seq.stats.record(proposal, result, emitted, part[1])

    def _emit(self, seq: Sequence, tokens: list[int]) -> int:
        """Append tokens up to a stop token or max_tokens; returns how many were consumed."""
        before, used = len(seq.output), 0
        stops = seq.params.stop_token_ids
        for tok in tokens:
            used += 1
            if tok in stops:
                seq.finish_reason = "stop"
                break
            seq.output.append(tok)
            if len(seq.output) >= seq.params.max_tokens:
                seq.finish_reason = "length"
                break
        if seq.on_update is not None and len(seq.output) > before:
            seq.on_update(seq, seq.output[before:])
        return used

    # ----- cost calibration ------------------------------------------------------------------
    @torch.inference_mode()
    def calibrate(self, context: int = 64, reps: int = 3) -> None:
        """Time every target forward the policy can choose (chains of 1..max_draft+1 tokens, the
        drafter's trees of w*k + 1 nodes, a few batch totals) and the drafter's cost per depth,
        so the policy starts from measured costs, not assumptions (DESIGN.md: the verify ratio
        r_k is measured). Each shape runs once untimed first: the first forward of a new shape
        is a one-off (kernel set-up) several times slower than the rest."""
        if self.runner.free_slots == 0:
            return
        slot = self.runner.allocate()
        try:
            context = min(context, self.runner.capacity // 2)
            prefill = self.runner.prefill(slot, [0] * context)
            room = self.runner.capacity - context - 1
            # The times as shapes, at this thread count's speed 1.
            self.costs.condition = torch.get_num_threads()
            self.costs.speeds[self.costs.condition] = 1.0
            for t, seconds in self._time_verifies(slot, room, reps).items():
                self.costs.times[t] = seconds
            timer = getattr(self.drafter, "time_draft", None)
            if timer is not None:
                k = self.cfg.policy.max_draft
                verify = Proposal.chain([0] * min(k, room - 1))

                def target_forward() -> None:  # as in serving, between two drafts
                    float(self.runner.verify(slot, 0, verify).logits[0, -1, 0])

                self.costs.draft_token_s = timer(prefill.fused_hidden[0], k, reps,
                                                 target_forward)
        finally:
            self.runner.release(slot)

    def _time_verifies(self, slot: int, room: int, reps: int) -> dict[int, float]:
        """Median seconds of a verify forward per number of tokens, over ``reps`` timed rounds."""
        k_max, w = self.cfg.policy.max_draft, self.policy.cfg.tree_width
        shapes = {t: Proposal.chain([0] * (t - 1)) for t in range(1, k_max + 2)}
        for k in range(1, k_max + 1) if w > 1 else ():  # trees as the drafter builds them
            shapes[w * k + 1] = Proposal.branches([0] * (w * k), w)
        # A few totals a batch of drafting requests reaches (one request's verify of as many).
        batch_max = self.runner.max_slots * (k_max + 1)
        for t in range(2 * (k_max + 1), batch_max + 1, k_max + 1):
            shapes.setdefault(t, Proposal.chain([0] * (t - 1)))
        shapes = {t: p for t, p in shapes.items() if t <= room}
        timings: dict[int, list[float]] = {t: [] for t in shapes}
        for rep in range(reps + 1):  # round 0 warms up and is discarded
            for t, proposal in shapes.items():
                start = time.perf_counter()
                out = self.runner.verify(slot, 0, proposal)
                float(out.logits[0, -1, 0])  # wait for the device (CUDA runs asynchronously)
                if rep:
                    timings[t].append(time.perf_counter() - start)
        return {t: sorted(ts)[len(ts) // 2] for t, ts in timings.items()}
