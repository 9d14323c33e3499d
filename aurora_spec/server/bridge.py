"""Between the engine thread and asyncio request handlers.

The engine calls ``on_update`` on its own thread; ``Generation`` forwards those calls into an
asyncio queue with ``call_soon_threadsafe`` so handlers simply ``await`` token batches.
``Admission`` bounds how many requests the engine holds (running + waiting): a request past the
bound is refused up front (429) instead of queueing without limit. A request leaves the bound when
the engine retires it (finished, stopped or aborted), i.e. when its KV slot is free again.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from aurora_spec.server.text import IncrementalDetokenizer, StopMatcher
from aurora_spec.types import SamplingParams


class Admission:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._n = 0
        self._lock = threading.Lock()

    def try_enter(self) -> bool:
        with self._lock:
            if self._n >= self.capacity:
                return False
            self._n += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._n -= 1

    @property
    def in_flight(self) -> int:
        return self._n


class Generation:
    """One request inside the engine, seen from the event loop."""

    def __init__(self, engine: Any, admission: Admission, prompt_ids: list[int],
                 params: SamplingParams, request_id: str, domain: str | None,
                 record_traces: bool) -> None:
        self.engine, self.admission, self.request_id = engine, admission, request_id
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[list[int] | None] = asyncio.Queue()
        self.done = False
        self.started = time.perf_counter()
        self.first_token_s: float | None = None
        try:
            self.seq = engine.add_request(prompt_ids, params, request_id, domain, record_traces,
                                          self._on_update)
        except BaseException:
            admission.leave()
            raise

    def _on_update(self, seq: Any, tokens: list[int]) -> None:  # engine thread
        item = list(tokens) if tokens else None  # [] means: the request left the engine
        if item is None:
            self.admission.leave()
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed (shutdown): nobody is listening
            pass

    async def updates(self) -> AsyncIterator[list[int]]:
        while not self.done:
            item = await self.queue.get()
            if item is None:
                self.done = True
                return
            if self.first_token_s is None:
                self.first_token_s = time.perf_counter() - self.started
            yield item

    def abort(self) -> None:
        if not self.done:
            self.engine.abort(self.request_id)

    @property
    def finish_reason(self) -> str:
        return self.seq.finish_reason or "abort"


class TextStream:
    """Token batches -> text deltas, with stop strings applied on the detokenized text."""

    def __init__(self, gen: Generation, tokenizer: Any, stops: list[str],
                 meter: Callable[[int], None] | None = None) -> None:
        self.gen = gen
        self.meter = meter  # told how many tokens each engine update brought (tokens/s)
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stops = StopMatcher(stops)
        self.completion_tokens = 0

    async def deltas(self) -> AsyncIterator[str]:
        """Yield text as it becomes final; returns once the engine has retired the request."""
        async for tokens in self.gen.updates():
            if self.stops.stopped:
                continue  # aborted on a stop string: drain until the engine confirms
            self.completion_tokens += len(tokens)
            if self.meter is not None:
                self.meter(len(tokens))
            delta = self.stops.feed(self.detok.push(tokens))
            if self.stops.stopped:
                self.gen.abort()  # frees the slot at the next engine step
            if delta:
                yield delta
        tail = self.stops.feed(self.detok.flush()) + self.stops.finish()
        if tail:
            yield tail

    @property
    def text(self) -> str:
        return self.stops.output

    @property
    def finish_reason(self) -> str:
        """OpenAI's finish reason: "stop" (EOS or a stop string), "length"; else the engine's."""
        return "stop" if self.stops.stopped else self.gen.finish_reason
