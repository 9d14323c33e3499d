"""API-key / admin-key checks and the request body limit, as plain ASGI middleware.

Middleware (not per-route dependencies) so that no route can forget the check, including the
ones FastAPI adds itself (/docs, /openapi.json).
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aurora_spec.server.errors import error_response

# GET / is the live page's static shell: no data in it (the page fetches /stats with the key
# taken from the URL fragment), so a browser can open it without sending a header.
PUBLIC_PATHS = frozenset({"/health", "/"})


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def _same(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and hmac.compare_digest(a.encode(), b.encode())


class AuthMiddleware:
    def __init__(self, app: ASGIApp, api_key: str | None, admin_key: str | None) -> None:
        self.app, self.api_key, self.admin_key = app, api_key, admin_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, token = scope["path"], bearer_token(scope)
        if path == "/admin" or path.startswith("/admin/"):
            refusal = self._admin_refusal(token)
        elif path in PUBLIC_PATHS or self.api_key is None:
            refusal = None
        elif _same(token, self.api_key) or _same(token, self.admin_key):
            refusal = None
        else:
            refusal = error_response(401, "missing or invalid API key (Authorization: Bearer)",
                                     code="invalid_api_key",
                                     headers={"WWW-Authenticate": "Bearer"})
        if refusal is not None:
            return await refusal(scope, receive, send)
        await self.app(scope, receive, send)

    def _admin_refusal(self, token: str | None):
        if self.admin_key is None:
            return error_response(404, "admin routes are disabled (no admin key configured)",
                                  code="admin_disabled")
        if _same(token, self.admin_key):
            return None
        if _same(token, self.api_key):
            return error_response(403, "the API key does not grant admin access",
                                  code="admin_key_required")
        return error_response(401, "missing or invalid admin key", code="invalid_admin_key",
                              headers={"WWW-Authenticate": "Bearer"})


class BodyLimitMiddleware:
    """Reads the body up front (it is small by definition) and refuses it past ``limit`` bytes,
    whether or not the client sent a Content-Length."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = error_response(413, f"request body exceeds {self.limit} bytes",
                                   code="body_too_large")
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                return await too_large(scope, receive, send)  # refuse before reading it
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # disconnected before the body was complete
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await too_large(scope, receive, send)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # afterwards: wait for http.disconnect as usual

    return replay
