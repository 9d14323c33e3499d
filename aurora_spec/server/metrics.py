"""Prometheus metrics for GET /metrics (own registry per app, so tests can build several apps).

Per-position acceptance comes two ways: counters of draft tokens proposed / accepted at each
depth over all requests (``accepted/proposed`` at depth i is the unconditional rate of reaching
depth i), and ``aurora_alpha`` -- the engine's live estimate of alpha_i, the conditional rate the
draft-length policy uses (DESIGN.md section 1).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import deque
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from aurora_spec.server.telemetry import RequestRecord

log = logging.getLogger(__name__)

TAU_BUCKETS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0, 10.0)
RATE_BUCKETS = (1, 2, 5, 10, 15, 20, 30, 50, 75, 100, 200, 500)
# learner.status() key -> (metric name, help, is_counter)
LEARNER_METRICS = {
    "live_version": ("aurora_draft_version", "live draft version", False),
    "trainer_step": ("aurora_trainer_step", "optimizer steps taken by the online trainer", False),
    "loss": ("aurora_trainer_loss", "latest training loss", False),
    "buffer_fill": ("aurora_trace_buffer_fill", "trace buffer fill (0..1)", False),
    "dropped_traces": ("aurora_dropped_traces", "traces dropped by a full buffer", True),
    "swaps": ("aurora_draft_swaps", "draft swaps", True),
    "rollbacks": ("aurora_draft_rollbacks", "draft rollbacks", True),
    "vocab_coverage": ("aurora_vocab_coverage", "share of recently emitted tokens in the draft "
                       "vocab (in part the tokens it was chosen from)", False),
    "vocab_coverage_unseen": ("aurora_vocab_coverage_unseen", "share of the tokens emitted since "
                              "the draft vocab was chosen that are in it", False),
    "paused": ("aurora_learning_paused", "1 when training is paused", False),
    "learning": ("aurora_learning_enabled", "1 when online learning is on", False),
}


class Throughput:
    """Tokens emitted over a sliding window (event-loop thread only)."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self.events: deque[tuple[float, int]] = deque()

    def add(self, n: int) -> None:
        self.events.append((time.monotonic(), n))
        self._trim()

    def _trim(self) -> None:
        cutoff = time.monotonic() - self.window_s
        while self.events and self.events[0][0] < cutoff:
            self.events.popleft()

    def rate(self) -> float:
        self._trim()
        return sum(n for _, n in list(self.events)) / self.window_s


class Metrics:
    def __init__(self, engine: Any, learner: Any, admission: Any, max_domains: int = 32) -> None:
        self.registry = r = CollectorRegistry()
        self.throughput = Throughput()
        self.max_domains = max_domains
        self._domains: set[str] = set()
        self.requests = Counter("aurora_requests", "finished requests", ["endpoint", "finish_reason"],
                                registry=r)
        self.rejected = Counter("aurora_rejected_requests", "requests refused", ["reason"], registry=r)
        self.tau = Histogram("aurora_request_tau", "per-request tau (tokens per verify step)",
                             buckets=TAU_BUCKETS, registry=r)
        self.domain_tau = Histogram("aurora_domain_request_tau", "per-request tau by domain tag",
                                    ["domain"], buckets=TAU_BUCKETS, registry=r)
        self.rate = Histogram("aurora_request_tokens_per_second", "per-request decode tokens/s",
                              buckets=RATE_BUCKETS, registry=r)
        self.duration = Histogram("aurora_request_duration_seconds", "request wall time", registry=r)
        self.tokens = Counter("aurora_generated_tokens", "completion tokens", registry=r)
        self.prompt_tokens = Counter("aurora_prompt_tokens", "prompt tokens", registry=r)
        self.verify_steps = Counter("aurora_verify_steps", "verify steps", registry=r)
        self.drafted = Counter("aurora_drafted_tokens", "draft tokens proposed", registry=r)
        self.accepted = Counter("aurora_accepted_tokens", "draft tokens accepted", registry=r)
        self.pos_proposed = Counter("aurora_draft_position_proposed",
                                    "verify steps that drafted a token at this depth",
                                    ["position"], registry=r)
        self.pos_accepted = Counter("aurora_draft_position_accepted",
                                    "verify steps that accepted the token at this depth",
                                    ["position"], registry=r)
        r.register(_LiveCollector(engine, learner, admission, self.throughput))

    def domain_label(self, domain: str) -> str:
        if domain in self._domains or len(self._domains) < self.max_domains:
            self._domains.add(domain)
            return domain
        return "other"  # bound label cardinality: domain tags come from clients

    def observe(self, rec: RequestRecord) -> None:
        self.requests.labels(rec.endpoint, rec.finish_reason).inc()
        self.duration.observe(rec.ms / 1000)
        self.tokens.inc(rec.completion_tokens)
        self.prompt_tokens.inc(rec.prompt_tokens)
        if rec.verify_steps:
            self.tau.observe(rec.tau)
            self.rate.observe(rec.tokens_per_s)
            if rec.domain:
                self.domain_tau.labels(self.domain_label(rec.domain)).observe(rec.tau)
        self.verify_steps.inc(rec.verify_steps)
        self.drafted.inc(rec.drafted)
        self.accepted.inc(rec.accepted)
        for i, n in enumerate(rec.proposed_per_depth):
            self.pos_proposed.labels(str(i + 1)).inc(n)
        for i, n in enumerate(rec.accepted_per_depth):
            self.pos_accepted.labels(str(i + 1)).inc(n)


class _LiveCollector:
    """Values read at scrape time: queue, engine estimates, learner status."""

    def __init__(self, engine: Any, learner: Any, admission: Any, throughput: Throughput) -> None:
        self.engine, self.learner, self.admission, self.throughput = (
            engine, learner, admission, throughput)

    def collect(self):
        running = len(self.engine.running)
        yield _gauge("aurora_running_requests", "requests holding a KV slot", running)
        yield _gauge("aurora_queue_depth", "admitted requests waiting for a KV slot",
                     max(0, self.admission.in_flight - running))
        yield _gauge("aurora_tokens_per_second", "tokens emitted per second, last 10 s",
                     self.throughput.rate())
        alpha = GaugeMetricFamily("aurora_alpha", "live estimate of per-position acceptance",
                                  labels=["position"])
        for i, a in enumerate(self.engine.policy.alpha):
            alpha.add_metric([str(i + 1)], float(a))
        yield alpha
        yield from learner_families(safe_status(self.learner))
        yield from drafter_families(self.engine.drafter)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))


def safe_status(learner: Any) -> dict[str, Any]:
    try:
        return dict(learner.status())
    except Exception:  # a broken learner must not break /metrics or /health
        log.exception("learner.status() failed")
        return {}


def drafter_families(drafter: Any):
    """The drafter's own counters as ``aurora_drafter_<key>`` gauges (ngram: hits and accepted
    tokens by source; eagle3 + lookup: accepted tokens of the merged tree, of the head alone and
    of the lookup chain alone). Read from the engine thread's live ints: slightly stale at most."""
    stats = getattr(drafter, "stats", None)
    if not callable(stats):
        return
    try:
        values = dict(stats())
    except Exception:  # a broken drafter must not break /metrics
        log.exception("drafter.stats() failed")
        return
    yield from status_families(values, "drafter")


def learner_families(status: dict[str, Any]):
    yield from status_families(status, "learner", LEARNER_METRICS)


def status_families(status: dict[str, Any], source: str,
                    known: dict[str, tuple[str, str, bool]] | None = None):
    """One metric per numeric entry of a status dict (booleans as 0/1, NaN skipped): the name,
    help and kind from ``known``, else the gauge ``aurora_<source>_<key>``."""
    for key, value in status.items():
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, int | float) or (isinstance(value, float) and math.isnan(value)):
            continue
        name, doc, counter = (known or {}).get(
            key, (f"aurora_{source}_" + re.sub(r"[^a-zA-Z0-9_]", "_", key), f"{source} {key}",
                  False))
        family = CounterMetricFamily if counter else GaugeMetricFamily
        yield family(name, doc, value=float(value))
