"""Everything a request handler needs, built once per app: runtime, learner, limits, telemetry."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from aurora_spec.cli import stop_token_ids
from aurora_spec.engine.loop import EngineLoop
from aurora_spec.flywheel.api import Learner
from aurora_spec.runtime import Runtime
from aurora_spec.server.bridge import Admission
from aurora_spec.server.errors import APIError
from aurora_spec.server.metrics import Metrics, safe_status
from aurora_spec.server.settings import ServerSettings
from aurora_spec.server.telemetry import History, RequestRecord, log_request


@dataclass
class ServerState:
    runtime: Runtime
    learner: Learner
    settings: ServerSettings
    admission: Admission
    metrics: Metrics
    history: History
    stop_ids: tuple[int, ...]
    loop: EngineLoop
    draining: bool = False
    started: float = field(default_factory=time.time)

    @classmethod
    def build(cls, runtime: Runtime, learner: Learner, settings: ServerSettings,
              loop: EngineLoop) -> ServerState:
        engine = runtime.engine
        admission = Admission(engine.runner.max_slots + settings.max_queue)
        return cls(runtime, learner, settings, admission,
                   Metrics(engine, learner, admission, settings.max_domains),
                   History(settings.history), stop_token_ids(runtime.info, runtime.tokenizer),
                   loop)

    @property
    def engine(self) -> Any:
        return self.runtime.engine

    @property
    def capacity(self) -> int:
        return self.engine.runner.capacity

    def model_ids(self) -> set[str]:
        info = self.runtime.info
        return {self.settings.model_name, info.name, info.dir.name, *self.settings.model_aliases}

    def check_model(self, name: str) -> None:
        if name not in self.model_ids():
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                                f"{self.settings.model_name!r}", "model", "model_not_found")

    def status(self) -> dict[str, Any]:
        """The learner's status, with the live draft version always present."""
        st = {str(k): _jsonable(v) for k, v in safe_status(self.learner).items()}
        head = getattr(self.engine.drafter, "head", None)
        st.setdefault("live_version", int(getattr(head, "version", 0)))
        self.history.note_version(int(st["live_version"]))
        return st

    def retry_after(self) -> int:
        """Seconds a refused client should wait: about one request's time per queued request
        ahead of it, divided among the slots; at least 1."""
        recent = [r.ms for _, r in list(self.history.records)[-20:]]
        per_request_s = (sum(recent) / len(recent) / 1000) if recent else 1.0
        slots = self.engine.runner.max_slots
        return max(1, min(60, round(per_request_s * (self.settings.max_queue + 1) / slots)))

    def record(self, rec: RequestRecord) -> None:
        self.history.add(rec)
        self.metrics.observe(rec)
        log_request(rec)


def _jsonable(v: Any) -> Any:
    """Learner status values as strict JSON (NaN is not JSON; objects become strings)."""
    if v is None or isinstance(v, bool | int | str):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    return str(v)


def server_state(request: Request) -> ServerState:
    return request.app.state.aurora
