"""The FastAPI application: ``create_app(runtime, learner, settings)``.

Lifecycle: the app starts the learner and then the engine loop, both on the engine thread that
loaded the model (engine/loop.py: one thread for all of the server's torch work); on shutdown
(uvicorn turns SIGTERM into one) it refuses new requests, lets in-flight ones finish, stops the
engine thread, then stops the learner with ``save=True`` so the live draft is kept.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import aurora_spec
from aurora_spec.engine.loop import EngineLoop
from aurora_spec.flywheel.api import Learner
from aurora_spec.runtime import Runtime
from aurora_spec.server import admin, live, openai_routes
from aurora_spec.server.errors import install_error_handlers
from aurora_spec.server.security import AuthMiddleware, BodyLimitMiddleware
from aurora_spec.server.settings import ServerSettings
from aurora_spec.server.state import ServerState, server_state
from aurora_spec.server.tracelog import TraceLog

log = logging.getLogger(__name__)


def create_app(runtime: Runtime, learner: Learner, settings: ServerSettings,
               loop: EngineLoop | None = None) -> FastAPI:
    """``loop``: the engine thread that loaded ``runtime`` (server/cli.py); a new one if None."""
    learner.attach(runtime.engine)
    st = ServerState.build(runtime, learner, settings, loop or EngineLoop())
    app = FastAPI(title="aurora-spec", version=aurora_spec.__version__, lifespan=_lifespan,
                  description="OpenAI-compatible speculative decoding server whose draft "
                              "model learns online from live traffic.")
    app.state.aurora = st
    app.state.tracelog = _trace_log(runtime, settings)
    if app.state.tracelog is not None:
        st.metrics.registry.register(app.state.tracelog.collector())
    install_error_handlers(app)
    app.include_router(openai_routes.router)
    app.include_router(live.router)
    if settings.admin_key is not None:  # without a key the routes do not exist (404)
        app.include_router(admin.router)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"], response_class=Response)
    # Starlette runs the last-added middleware first: auth, then the body limit.
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    app.add_middleware(AuthMiddleware, api_key=settings.api_key, admin_key=settings.admin_key)
    _document_model_ids(app, sorted(st.model_ids()))
    return app


def _trace_log(runtime: Runtime, settings: ServerSettings) -> TraceLog | None:
    """With a trace dir, wrap the engine's trace sink (the learner's) so each recorded step is
    also logged to disk; opted-out requests never reach the sink, so they are never written."""
    if settings.trace_dir is None:
        return None
    if not settings.learn:
        log.warning("learning is off: no traces are recorded, --trace-dir %s stays unused",
                    settings.trace_dir)
        return None
    tl = TraceLog(settings.trace_dir, settings.trace_retention_hours,
                  int(settings.trace_max_mb * (1 << 20)))
    runtime.engine.trace_sink = tl.wrap(runtime.engine.trace_sink)
    return tl


def _document_model_ids(app: FastAPI, ids: list[str]) -> None:
    """The server serves one model: say which names ``model`` accepts in /openapi.json, so
    clients and schema fuzzers know the valid values (anything else is a 404)."""
    default_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = default_openapi()
            for name in ("CompletionRequest", "ChatCompletionRequest"):
                prop = schema["components"]["schemas"][name]["properties"]["model"]
                prop["enum"] = ids
        assert app.openapi_schema is not None  # default_openapi() stored it
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


@asynccontextmanager
async def _lifespan(app: FastAPI):
    st: ServerState = app.state.aurora
    tracelog: TraceLog | None = app.state.tracelog
    if tracelog is not None:
        tracelog.start()  # before the engine thread, so no step waits long in the queue
    st.loop.call(st.learner.start)  # serving's thread: the learner reads its thread count
    st.loop.start(st.engine)
    log.info("serving %s (learning %s)", st.settings.model_name,
             "on" if st.settings.learn else "off")
    try:
        yield
    finally:
        await _drain(st)
        st.loop.stop(timeout=10)
        if tracelog is not None:
            tracelog.stop()  # after the engine thread: every recorded step is written
        if st.loop.alive:  # a step that never ended holds the engine thread
            st.learner.stop(save=True)
        else:
            st.loop.call(st.learner.stop, save=True)
        st.loop.close()
        log.info("stopped (learner asked to save the live draft)")


async def _drain(st: ServerState) -> None:
    """Refuse new requests and wait (bounded) for the admitted ones to leave the engine."""
    st.draining = True
    deadline = time.monotonic() + st.settings.shutdown_timeout_s
    while st.admission.in_flight > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if st.admission.in_flight > 0:
        log.warning("shutdown: %d request(s) still running after %.0f s; stopping anyway",
                    st.admission.in_flight, st.settings.shutdown_timeout_s)


async def health(request: Request) -> JSONResponse:
    """Liveness: 200 while the engine thread runs; 503 once it is gone."""
    st = server_state(request)
    alive = st.loop.alive
    status = st.status()
    body = {"status": "ok" if alive else "unavailable", "model": st.settings.model_name,
            "live_version": status.get("live_version", 0),
            "learning": bool(status.get("learning", st.settings.learn)),
            "draining": st.draining, "uptime_s": round(time.time() - st.started, 1),
            **st.settings.extra}
    return JSONResponse(body, status_code=200 if alive else 503)


async def metrics(request: Request) -> Response:
    st = server_state(request)
    st.status()  # notes the live version, so a swap between requests is still marked
    return Response(generate_latest(st.metrics.registry), media_type=CONTENT_TYPE_LATEST)
