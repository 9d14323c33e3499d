"""POST /v1/completions, POST /v1/chat/completions (plain and SSE streaming), GET /v1/models."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from aurora_spec.server.bridge import Generation, TextStream
from aurora_spec.server.errors import APIError, error_payload
from aurora_spec.server.protocol import (
    AuroraStats,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    SamplingFields,
    Usage,
)
from aurora_spec.server.requests import EngineInputs, engine_inputs
from aurora_spec.server.state import ServerState, server_state
from aurora_spec.server.telemetry import RequestRecord, decode_rate, draft_version

router = APIRouter()
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503)}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Call:
    """One admitted request: the engine-side generation plus what the response needs."""

    def __init__(self, st: ServerState, kind: str, inputs: EngineInputs, model: str) -> None:
        self.st, self.kind, self.inputs, self.model = st, kind, inputs, model
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.gen = Generation(st.engine, st.admission, inputs.prompt_ids, inputs.params,
                              self.id, inputs.domain, inputs.learn)
        self.text = TextStream(self.gen, st.runtime.tokenizer, inputs.stops,
                               st.metrics.throughput.add)

    def finish_reason(self) -> str:
        reason = self.text.finish_reason
        if reason == "abort":  # the client went away (or shutdown): nobody reads this answer
            raise APIError(499, "the request was aborted", None, "aborted")
        if reason not in ("stop", "length"):  # "error": the engine failed this request
            raise APIError(500, "generation failed inside the engine", None, "engine_error")
        return reason

    def usage(self) -> Usage:
        s = self.gen.seq.stats
        prompt, completion = len(self.inputs.prompt_ids), self.text.completion_tokens
        return Usage(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion, drafted_tokens=s.proposed,
                     accepted_tokens=s.accepted)

    def aurora(self) -> AuroraStats:
        s = self.gen.seq.stats
        return AuroraStats(tau=round(s.tau, 4), draft_version=draft_version(s, self.live()),
                           draft_versions=sorted(s.draft_versions), verify_steps=s.verify_steps,
                           tokens_per_s=round(decode_rate(s), 2), learn=self.inputs.learn)

    def live(self) -> int:
        return int(self.st.status().get("live_version", 0))

    def record(self) -> None:
        s = self.gen.seq.stats
        ttft = self.gen.first_token_s
        self.st.record(RequestRecord(
            id=self.id, endpoint=self.kind, t=time.time(),
            ms=(time.perf_counter() - self.gen.started) * 1000,
            prompt_tokens=len(self.inputs.prompt_ids),
            completion_tokens=self.text.completion_tokens, verify_steps=s.verify_steps,
            drafted=s.proposed, accepted=s.accepted, tau=s.tau, tokens_per_s=decode_rate(s),
            draft_version=draft_version(s, self.live()), finish_reason=self.text.finish_reason,
            learn=self.inputs.learn, domain=self.inputs.domain,
            ttft_ms=None if ttft is None else ttft * 1000, tau_head=s.tau_head,
            proposed_per_depth=list(s.proposed_per_depth),
            accepted_per_depth=list(s.accepted_per_depth)))


async def admit(st: ServerState, body: SamplingFields, request: Request, kind: str) -> Call:
    inputs = await run_in_threadpool(engine_inputs, st, body, request)  # tokenizing is CPU work
    if st.draining:
        st.metrics.rejected.labels("shutting_down").inc()
        raise APIError(503, "the server is shutting down", None, "shutting_down")
    if not st.admission.try_enter():
        st.metrics.rejected.labels("queue_full").inc()
        raise APIError(429, "the request queue is full; retry later", None, "queue_full",
                       {"Retry-After": str(st.retry_after())})
    return Call(st, kind, inputs, body.model)


async def collect(call: Call, request: Request) -> str:
    """Run a non-streaming request to the end; abort it if the client goes away."""
    parts: list[str] = []

    async def consume() -> None:
        async for delta in call.text.deltas():
            parts.append(delta)

    task = asyncio.ensure_future(consume())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await request.is_disconnected():
                call.gen.abort()  # the engine frees the slot; consume() then ends
        task.result()
    finally:
        if not task.done():  # our own handler was cancelled
            call.gen.abort()
            task.cancel()
        call.record()
    return "".join(parts)


@router.post("/v1/completions", response_model=CompletionResponse, responses=ERRORS)
async def completions(body: CompletionRequest, request: Request):
    st = server_state(request)
    call = await admit(st, body, request, "completion")
    if body.stream:
        return sse(call, body)
    text = await collect(call, request)
    return JSONResponse({
        "id": call.id, "object": "text_completion", "created": call.created, "model": body.model,
        "choices": [{"index": 0, "text": text, "logprobs": None,
                     "finish_reason": call.finish_reason()}],
        "usage": call.usage().model_dump(), "aurora": call.aurora().model_dump()})


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    st = server_state(request)
    call = await admit(st, body, request, "chat")
    if body.stream:
        return sse(call, body)
    text = await collect(call, request)
    return JSONResponse({
        "id": call.id, "object": "chat.completion", "created": call.created, "model": body.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "logprobs": None, "finish_reason": call.finish_reason()}],
        "usage": call.usage().model_dump(), "aurora": call.aurora().model_dump()})


@router.get("/v1/models", response_model=ModelList)
async def models(request: Request) -> ModelList:
    st = server_state(request)
    return ModelList(data=[ModelCard(id=st.settings.model_name, created=int(st.started))])


# ---- server-sent events -------------------------------------------------------------------


def sse(call: Call, body: SamplingFields) -> StreamingResponse:
    usage = body.stream_options is not None and body.stream_options.include_usage
    return StreamingResponse(events(call, usage), media_type="text/event-stream",
                             headers=SSE_HEADERS)


def _data(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


def chunk(call: Call, text: str | None, finish: str | None = None, role: bool = False) -> dict:
    base = {"id": call.id, "created": call.created, "model": call.model}
    if call.kind == "chat":
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**base, "object": "chat.completion.chunk", "choices": [choice]}
    choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    return {**base, "object": "text_completion", "choices": [choice]}


async def events(call: Call, include_usage: bool) -> AsyncIterator[str]:
    """The event stream. If the client disconnects, Starlette cancels this generator at its
    current await; ``finally`` then aborts the request so its KV slot is freed."""
    try:
        if call.kind == "chat":
            yield _data(chunk(call, "", role=True))
        async for delta in call.text.deltas():
            yield _data(chunk(call, delta))
        try:
            final = chunk(call, None if call.kind == "chat" else "", call.finish_reason())
        except APIError as e:
            yield _data(error_payload(e.message, e.code or "engine_error"))
        else:
            final["aurora"] = call.aurora().model_dump()
            yield _data(final)
            if include_usage:
                yield _data({**chunk(call, None), "choices": [],
                             "usage": call.usage().model_dump()})
        yield "data: [DONE]\n\n"
    finally:
        call.gen.abort()  # no-op when finished; after a disconnect it frees the slot
        call.record()
