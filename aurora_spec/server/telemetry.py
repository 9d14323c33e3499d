"""What the server remembers about finished requests: one record each, kept in a ring buffer for
the live page, written as one JSON log line, and folded into the Prometheus metrics."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

from aurora_spec.types import GenerationStats

access_log = logging.getLogger("aurora_spec.server.access")


@dataclass(frozen=True)
class RequestRecord:
    id: str
    endpoint: str
    t: float  # wall-clock end time (unix seconds)
    ms: float  # request duration
    prompt_tokens: int
    completion_tokens: int
    verify_steps: int
    drafted: int
    accepted: int
    tau: float
    tokens_per_s: float
    draft_version: int
    finish_reason: str
    learn: bool
    domain: str | None = None
    ttft_ms: float | None = None
    tau_head: float | None = None  # the learned head's own tau (eagle3 + lookup: without the chain)
    proposed_per_depth: list[int] = field(default_factory=list)
    accepted_per_depth: list[int] = field(default_factory=list)


def decode_rate(stats: GenerationStats) -> float:
    return stats.emitted / stats.decode_s if stats.decode_s > 0 else 0.0


def draft_version(stats: GenerationStats, live: int) -> int:
    """The version that served the request's last steps (the newest it saw), else the live one."""
    return max(stats.draft_versions) if stats.draft_versions else live


@dataclass(frozen=True)
class SwapEvent:
    t: float
    version: int


class History:
    """Recent request records and draft swaps, for the live page (bounded, thread-safe)."""

    def __init__(self, size: int) -> None:
        self.records: deque[tuple[int, RequestRecord]] = deque(maxlen=size)
        self.swaps: deque[SwapEvent] = deque(maxlen=256)
        self._seq = 0
        self._version: int | None = None
        self._lock = threading.Lock()

    def add(self, rec: RequestRecord) -> None:
        with self._lock:
            self._seq += 1
            self.records.append((self._seq, rec))

    def note_version(self, version: int) -> None:
        """Called with the live version whenever we look; a change is a swap (or a rollback)."""
        with self._lock:
            if self._version is not None and version != self._version:
                self.swaps.append(SwapEvent(time.time(), version))
            self._version = version

    def since(self, after: int) -> tuple[int, list[dict[str, Any]]]:
        with self._lock:
            rows = [dict(asdict(r), seq=s) for s, r in self.records if s > after]
            return self._seq, rows


def log_request(rec: RequestRecord) -> None:
    line = {"event": "request", "id": rec.id, "endpoint": rec.endpoint,
            "prompt_tokens": rec.prompt_tokens, "completion_tokens": rec.completion_tokens,
            "tau": round(rec.tau, 3), "drafted": rec.drafted, "accepted": rec.accepted,
            "draft_version": rec.draft_version, "tokens_per_s": round(rec.tokens_per_s, 2),
            "ms": round(rec.ms, 1), "finish_reason": rec.finish_reason, "learn": rec.learn,
            "domain": rec.domain}
    access_log.info(json.dumps(line, separators=(",", ":")))
