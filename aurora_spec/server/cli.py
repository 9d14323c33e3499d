"""``aurora serve``: the OpenAI-compatible server, learning online by default.

Default drafter: eagle3, with an n-gram lookup chain verified alongside the head's tree
(--no-lookup turns it off; drafters/hybrid.py). Without --draft-weights it starts from a random
head (day 0) and the online learner trains it from live traffic; that is the point of the server.
With --no-learn and no weights, a random head would never improve and only costs draft time, so
the default becomes ngram (prompt lookup + n-gram memory: useful from the first request, needs no
training).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from aurora_spec.cli import (
    UsageError,
    add_drafter_flags,
    add_model_flags,
    drafter_config,
    model_config,
)
from aurora_spec.flywheel.api import Learner, NullLearner
from aurora_spec.server.settings import ServerSettings

log = logging.getLogger(__name__)
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible server; the draft learns online",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    add_drafter_flags(p)
    p.set_defaults(drafter=None)  # resolved by default_drafter(): depends on --no-learn
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("AURORA_API_KEY"),
                   help="require Authorization: Bearer KEY (env AURORA_API_KEY)")
    p.add_argument("--admin-key", default=os.environ.get("AURORA_ADMIN_KEY"),
                   help="enable /admin/* with this key (env AURORA_ADMIN_KEY)")
    p.add_argument("--no-learn", action="store_true", help="serve a fixed draft, record nothing")
    p.add_argument("--checkpoint-dir", default=None,
                   help="where the learner keeps draft versions (default: memory/temp only)")
    p.add_argument("--trace-dir", default=None, metavar="DIR",
                   help="also append each verify step's trace (token ids and counts only: no "
                        "prompt text, no hidden states) as JSON lines to hourly files in DIR; "
                        "requests that opt out of learning, and all requests with "
                        "learning off, are never written. Without --trace-dir nothing is "
                        "written to disk: traces stay in memory")
    p.add_argument("--trace-retention-hours", type=float, default=24.0, metavar="H",
                   help="delete trace files older than this (default 24)")
    p.add_argument("--trace-max-mb", type=float, default=256.0, metavar="M",
                   help="delete the oldest trace files while DIR holds more (default 256)")
    p.add_argument("--trainer-threads", type=int, default=None,
                   help="torch threads of the trainer process (default: every thread for an "
                        "idle-class trainer, which only uses what serving leaves; 1 for a "
                        "sharing one)")
    p.add_argument("--trainer-idle", action=argparse.BooleanOptionalAction, default=None,
                   help="run a CPU trainer under the idle scheduling class: it learns only on "
                        "CPU time serving leaves, and serving keeps all its threads; "
                        "--no-trainer-idle: serving gives the trainer --trainer-threads while "
                        "it trains (default: idle when serving starts from a trained head, "
                        "sharing from a day-0 head)")
    p.add_argument("--trainer-rests", action=argparse.BooleanOptionalAction, default=None,
                   help="let the trainer rest when its candidates stop beating the live head, "
                        "until traffic shifts or enough new data arrives (default: a sharing "
                        "trainer rests, giving its thread back; an idle-class one, which frees "
                        "nothing by resting, does not)")
    p.add_argument("--rollback-paired", action=argparse.BooleanOptionalAction, default=True,
                   help="when a new draft version's live acceptance drops, let the trainer "
                        "compare it with the previous version on the same recent traffic and "
                        "roll back only if it loses there (default); --no-rollback-paired: "
                        "roll back on the live drop alone")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a slot before 429 (default 64)")
    p.add_argument("--max-batch", "--max-slots", dest="max_slots", type=int, default=4,
                   help="requests decoded at once (KV cache slots)")
    p.add_argument("--max-tokens-limit", type=int, default=2048, help="largest max_tokens")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body limit")
    p.add_argument("--served-model-name", default=None, help="model id clients use")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on SIGTERM")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=cmd_serve)


def default_drafter(a: argparse.Namespace) -> str:
    if a.drafter:
        return a.drafter
    return "ngram" if a.no_learn and not a.draft_weights else "eagle3"


def make_learner(a: argparse.Namespace, runtime: Any) -> Learner:
    """The online learner when learning is on and it is available; else a fixed draft."""
    if a.no_learn:
        return NullLearner()
    if a.drafter != "eagle3":
        log.warning("online learning trains the eagle3 head; with --drafter %s it is off",
                    a.drafter)
        return NullLearner()
    try:
        from aurora_spec.flywheel.config import LearnerConfig
        from aurora_spec.flywheel.learner import OnlineLearner
    except ModuleNotFoundError as e:
        if e.name not in ("aurora_spec.flywheel.learner", "aurora_spec.flywheel.config"):
            raise
        log.warning("aurora_spec.flywheel.learner is not available: serving a fixed draft")
        return NullLearner()
    cfg = LearnerConfig(checkpoint_dir=a.checkpoint_dir, trainer_threads=a.trainer_threads,
                        trainer_idle=a.trainer_idle, trainer_rests=a.trainer_rests,
                        rollback_paired=a.rollback_paired)
    return OnlineLearner(runtime.model, config=cfg)


def server_settings(a: argparse.Namespace, learn: bool = True) -> ServerSettings:
    if not 0 < a.port < 65536:
        raise UsageError("--port must be in 1..65535")
    bad_threads = a.trainer_threads is not None and a.trainer_threads < 1
    if a.max_slots < 1 or a.max_queue < 0 or bad_threads:
        raise UsageError("--max-batch and --trainer-threads must be >= 1, --max-queue >= 0")
    try:
        return ServerSettings(
            model_name=a.served_model_name or a.model, model_aliases=(a.model,),
            api_key=a.api_key or None, admin_key=a.admin_key or None, max_queue=a.max_queue,
            max_tokens_limit=a.max_tokens_limit, max_body_bytes=a.max_body_bytes, learn=learn,
            shutdown_timeout_s=a.shutdown_timeout, trace_dir=a.trace_dir,
            trace_retention_hours=a.trace_retention_hours, trace_max_mb=a.trace_max_mb,
            extra={"drafter": a.drafter, "max_batch": a.max_slots})
    except ValueError as e:
        raise UsageError(str(e)) from e


def build_app(a: argparse.Namespace,
              learner_factory: Callable[[argparse.Namespace, Any], Learner] = make_learner) -> Any:
    """Load the model, build the learner and the app (no sockets yet).

    ``learner_factory(args, runtime)`` gets the loaded runtime because a learner needs the
    target model (its lm_head and embeddings are the training targets). Both are built on the
    engine thread, which later decodes: one OpenMP team in the process (engine/loop.py); the
    main thread, left to HTTP, runs whatever torch kernel it meets on one core."""
    from aurora_spec.drafters.policy import PolicyConfig
    from aurora_spec.engine.engine import EngineConfig
    from aurora_spec.engine.loop import EngineLoop
    from aurora_spec.runtime import build_runtime
    from aurora_spec.server.app import create_app
    from aurora_spec.threads import single_thread_kernels

    a.drafter = default_drafter(a)
    server_settings(a)  # validate flags before the slow model load
    mcfg, dcfg = model_config(a, max_slots=a.max_slots), drafter_config(a)
    single_thread_kernels()
    loop = EngineLoop()
    runtime = loop.call(build_runtime, mcfg, dcfg,
                        EngineConfig(PolicyConfig(max_draft=a.max_draft)))
    learner = loop.call(learner_factory, a, runtime)
    runtime.engine.trace_sink = learner.trace_sink  # before the engine thread starts
    runtime.engine.prefill_sink = learner.prefill_sink
    settings = server_settings(a, learn=not isinstance(learner, NullLearner))
    return create_app(runtime, learner, settings, loop)


def configure_logging(level: str) -> None:
    """Request logs: one bare JSON object per line on stderr; everything else: plain lines."""
    access = logging.getLogger("aurora_spec.server.access")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False
    logging.getLogger("aurora_spec").setLevel(level.upper())


def cmd_serve(a: argparse.Namespace) -> int:
    import uvicorn

    configure_logging(a.log_level)
    if a.host not in LOOPBACK and not a.api_key:
        log.warning("binding %s without --api-key: anyone who can reach it can use it", a.host)
    app = build_app(a)
    st = app.state.aurora
    log.info("aurora serve: http://%s:%d  model %s  drafter %s  learning %s", a.host, a.port,
                st.settings.model_name, a.drafter, "on" if st.settings.learn else "off")
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level, access_log=False,
                timeout_graceful_shutdown=a.shutdown_timeout)
    return 0
