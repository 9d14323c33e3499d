"""The live page: GET / (one self-contained HTML file, no external assets) and GET /stats, the
JSON it polls (recent request records, swaps, learner status)."""

from __future__ import annotations

import time
from functools import cache
from importlib.resources import files
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from aurora_spec.server.state import server_state

router = APIRouter()
RECORD_FIELDS = ("seq", "t", "endpoint", "tau", "tau_head", "tokens_per_s", "completion_tokens",
                 "ms", "draft_version", "domain", "finish_reason")


@cache
def page_html() -> str:
    return files("aurora_spec.server").joinpath("live.html").read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def live_page() -> HTMLResponse:
    return HTMLResponse(page_html(), headers={"Cache-Control": "no-cache"})


@router.get("/stats")
async def stats(request: Request, since: int = Query(0, ge=0, le=2**62)) -> dict[str, Any]:
    """Records newer than ``since`` (the page sends back the ``seq`` it got last time)."""
    st = server_state(request)
    status = st.status()
    last, rows = st.history.since(since)
    engine = st.engine
    return {
        "now": time.time(),
        "started": st.started,
        "model": st.settings.model_name,
        "server": st.settings.extra,
        "seq": last,
        "records": [{k: r[k] for k in RECORD_FIELDS} for r in rows],
        "swaps": [{"t": s.t, "version": s.version} for s in list(st.history.swaps)],
        "status": status,
        "live_version": status.get("live_version", 0),
        "tokens_per_s": round(st.metrics.throughput.rate(), 2),
        "running": len(engine.running),
        "queued": max(0, st.admission.in_flight - len(engine.running)),
        "alpha": [round(float(a), 3) for a in engine.policy.alpha],
    }
