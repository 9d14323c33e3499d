"""Server settings: limits, keys and names. Built by ``aurora serve`` from flags, or by tests."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ServerSettings:
    model_name: str = "smollm2-135m"  # the id /v1/models reports; requests may also use aliases
    model_aliases: tuple[str, ...] = ()  # other names accepted in the ``model`` field
    api_key: str | None = None  # when set, every route but /health and / needs Bearer <key>
    admin_key: str | None = None  # when unset, /admin/* answers 404
    max_queue: int = 64  # requests waiting for a KV slot; beyond slots + max_queue -> 429
    max_tokens_limit: int = 2048  # the largest max_tokens a request may ask for
    default_max_tokens: int = 16  # completions without max_tokens (OpenAI's default)
    max_body_bytes: int = 1 << 20
    max_stop_strings: int = 16
    learn: bool = True  # False: no request's traces reach the learner
    shutdown_timeout_s: float = 30.0  # SIGTERM: how long in-flight requests may take to finish
    history: int = 2000  # request records kept for the live page
    max_domains: int = 32  # distinct domain labels in /metrics (cardinality bound)
    trace_dir: str | None = None  # None: traces stay in memory; else JSON lines kept on disk
    trace_retention_hours: float = 24.0  # trace files older than this are deleted
    trace_max_mb: float = 256.0  # oldest trace files are deleted while the dir holds more
    extra: dict = field(default_factory=dict)  # free-form facts shown by /health (drafter...)

    def __post_init__(self) -> None:
        if self.max_queue < 0 or self.max_tokens_limit < 1 or self.max_body_bytes < 1024:
            raise ValueError("max_queue must be >= 0, max_tokens_limit >= 1, "
                             "max_body_bytes >= 1024")
        if not (self.trace_retention_hours > 0 and self.trace_max_mb > 0):
            raise ValueError("trace retention hours and trace max MB must be > 0")
        if self.admin_key is not None and self.admin_key == self.api_key:
            raise ValueError("the admin key must differ from the API key")
