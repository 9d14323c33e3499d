"""Admin routes (POST /admin/pause|resume|swap|rollback|reset, GET /admin/status).

The admin key is checked by AuthMiddleware; without one configured these routes answer 404.
Learner calls may block (a swap waits for the engine thread), so they run in the threadpool:
plain ``def`` handlers.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request

from aurora_spec.server.state import server_state

log = logging.getLogger(__name__)
router = APIRouter(prefix="/admin", tags=["admin"])


def _done(request: Request, action: str, result: Any = None) -> dict[str, Any]:
    st = server_state(request)
    log.info("admin action %s -> %s", action, result)
    out: dict[str, Any] = {"action": action, "status": st.status()}
    if result is not None:
        out["ok"] = bool(result)
    return out


@router.get("/status")
def status(request: Request) -> dict[str, Any]:
    return {"status": server_state(request).status()}


@router.post("/pause")
def pause(request: Request) -> dict[str, Any]:
    server_state(request).learner.pause()
    return _done(request, "pause")


@router.post("/resume")
def resume(request: Request) -> dict[str, Any]:
    server_state(request).learner.resume()
    return _done(request, "resume")


@router.post("/swap")
def swap(request: Request) -> dict[str, Any]:
    return _done(request, "swap", server_state(request).learner.swap_now())


@router.post("/rollback")
def rollback(request: Request) -> dict[str, Any]:
    return _done(request, "rollback", server_state(request).learner.rollback())


@router.post("/reset")
def reset(request: Request) -> dict[str, Any]:
    server_state(request).learner.reset()
    return _done(request, "reset")
