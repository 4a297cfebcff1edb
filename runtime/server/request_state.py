"""One request's output side: the engine's token sink, turning token ids into client events.

The engine calls `on_token` / `on_finish` on its own thread. The state decodes UTF-8 safe text
pieces, holds back text that may start a stop string (and stops the job when one appears), times
the first token and the gaps between tokens, and hands `TextPiece` / `Finished` events to the
asyncio loop, where `GenerationService.stream` yields them. When the engine finishes the job the
state first frees its place in the server (slot and adapter lease) on the loop, then delivers
`Finished`: a client that hears "finished" can count on the slot being free.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from loraplex.runtime.engines.base import FinishReason, GenerationJob, SamplingParams
from loraplex.runtime.errors import EngineFailure
from loraplex.runtime.server.detokenizer import IncrementalDetokenizer, StopMatcher
from loraplex.runtime.server.metrics import ServerMetrics
from loraplex.runtime.server.registry import Lease
from loraplex.runtime.server.tokenizer import TextTokenizer


@dataclass
class Started:
    adapter: str
    adapter_version: str
    request_id: str
    prompt_tokens: int


@dataclass
class TextPiece:
    text: str
    token_ids: list[int]


@dataclass
class Timings:
    queue_ms: float
    time_to_first_token_ms: float
    total_ms: float


@dataclass
class Finished:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    timings: Timings


class RequestState:
    """Implements the engine's `TokenSink` for one request; owns the request's lease until it ends."""

    def __init__(self, *, request_id: str, prompt_ids: list[int], params: SamplingParams, lease: Lease,
                 tokenizer: TextTokenizer, metrics: ServerMetrics, received: float,
                 on_done: Callable[[RequestState], None]):
        self.lease = lease
        self.adapter = lease.version.name
        self.prompt_tokens = len(prompt_ids)
        self.received = received
        self.job = GenerationJob(request_id, prompt_ids, params, lease.version.handle, self)
        self._metrics = metrics
        self._on_done = on_done
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._stops = StopMatcher(params.stop)
        self._held: list[int] = []  # tokens whose text is not released yet
        self._first: float | None = None
        self._last = 0.0
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[TextPiece | Finished] = asyncio.Queue()

    # -- the engine's thread -------------------------------------------------------------
    def on_token(self, token: int) -> None:
        now = time.monotonic()
        if self._first is None:
            self._first = now
            self._metrics.ttft.labels(self.adapter).observe(now - self.received)
        else:
            self._metrics.token_latency.labels(self.adapter).observe(now - self._last)
        self._last = now
        self._held.append(token)
        text = self._stops.feed(self._detokenizer.push(token))
        if self._stops.stopped:
            self.job.stop(FinishReason.STOP)
        if text:
            self._emit(TextPiece(text, self._held))
            self._held = []

    def on_finish(self, reason: FinishReason) -> None:
        now = time.monotonic()
        stopped = self._stops.stopped
        tail = "" if stopped else self._stops.feed(self._detokenizer.flush()) + self._stops.flush()
        if tail or self._held:
            self._emit(TextPiece(tail, self._held))
        completion = len(self._detokenizer.tokens)
        started = self.job.started_at or now
        timings = Timings(
            queue_ms=(started - self.job.submitted_at) * 1000,
            time_to_first_token_ms=((self._first or now) - self.received) * 1000,
            total_ms=(now - self.received) * 1000,
        )
        status = "OK" if self.job.error is None else "INTERNAL"
        self._metrics.tokens.labels(self.adapter, status).inc(completion)
        self._metrics.prompt_tokens.labels(self.adapter).inc(self.prompt_tokens)
        finished = Finished(FinishReason.STOP if stopped else reason, self.prompt_tokens, completion, timings)
        self._call_soon(self._finish_on_loop, finished)

    # -- the loop --------------------------------------------------------------------------
    async def events(self) -> AsyncIterator[TextPiece | Finished]:
        """Text pieces, then `Finished`; raises EngineFailure if the engine failed the job."""
        while True:
            event = await self._events.get()
            if isinstance(event, Finished) and self.job.error is not None:
                raise EngineFailure(f"the engine failed on request {self.job.request_id}: {self.job.error}")
            yield event
            if isinstance(event, Finished):
                return

    def _finish_on_loop(self, finished: Finished) -> None:
        self._on_done(self)  # slot and lease freed before the client hears
        self._events.put_nowait(finished)

    def _emit(self, event: TextPiece) -> None:
        self._call_soon(self._events.put_nowait, event)

    def _call_soon(self, callback: Callable, *args: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone (server stopped): nobody listens
            self._loop.call_soon_threadsafe(callback, *args)
