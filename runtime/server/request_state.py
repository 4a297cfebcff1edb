"""One request's output side: the engine's token sink and the output processor on the event loop.

The engine calls `on_output` on its own thread once per step with the job's new tokens; the state
only hands the output to the asyncio loop, so the engine thread never detokenizes. On the loop it
decodes UTF-8 safe text pieces, holds back text that may start a stop string (and stops the job
when one appears: the engine ends it before its next step, and tokens it made meanwhile are
dropped), times the first token and the gaps between tokens, and queues `TextPiece` / `Finished`
events, which `GenerationService.stream` yields. When the engine finishes the job the state first
frees its place in the server (slot and adapter lease), then delivers `Finished`: a client that
hears "finished" can count on the slot being free.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from loraplex.runtime.engines.base import FinishReason, GenerationJob, SamplingParams, StepOutput, TokenLogprobs
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
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per token id, when asked for


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
        self._held_logprobs: list[TokenLogprobs] = []  # theirs, when the request asked for them
        self._first: float | None = None
        self._last = 0.0
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[TextPiece | Finished] = asyncio.Queue()

    # -- the engine's thread -------------------------------------------------------------
    def on_output(self, output: StepOutput) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone (server stopped): nobody listens
            self._loop.call_soon_threadsafe(self._process, output)

    # -- the loop --------------------------------------------------------------------------
    def _process(self, output: StepOutput) -> None:
        if output.tokens and not self._stops.stopped:
            self._on_tokens(output.tokens, output.at, output.logprobs)
        if output.finish is not None:
            self._on_finish(output.finish, output.at)

    def _on_tokens(self, tokens: tuple[int, ...], at: float, logprobs: tuple[TokenLogprobs, ...] = ()) -> None:
        gaps = len(tokens)  # the wait since the last token, shared by the tokens a step made together
        if self._first is None:
            self._first = self._last = at
            self._metrics.ttft.labels(self.adapter).observe(at - self.received)
            gaps -= 1
        for _ in range(gaps):
            self._metrics.token_latency.labels(self.adapter).observe((at - self._last) / len(tokens))
        self._last = at
        text = ""
        for i, token in enumerate(tokens):
            self._held.append(token)
            if i < len(logprobs):
                self._held_logprobs.append(logprobs[i])
            text += self._stops.feed(self._detokenizer.push(token))
            if self._stops.stopped:
                self.job.stop(FinishReason.STOP)
                break
        if text:
            self._events.put_nowait(TextPiece(text, self._held, self._held_logprobs))
            self._held, self._held_logprobs = [], []

    def _on_finish(self, reason: FinishReason, now: float) -> None:
        stopped = self._stops.stopped
        tail = "" if stopped else self._stops.feed(self._detokenizer.flush()) + self._stops.flush()
        if tail or self._held:
            self._events.put_nowait(TextPiece(tail, self._held, self._held_logprobs))
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
        self._on_done(self)  # slot and lease freed before the client hears
        self._events.put_nowait(Finished(FinishReason.STOP if stopped else reason, self.prompt_tokens, completion,
                                         timings))

    async def events(self) -> AsyncIterator[TextPiece | Finished]:
        """Text pieces, then `Finished`; raises EngineFailure if the engine failed the job."""
        while True:
            event = await self._events.get()
            if isinstance(event, Finished) and self.job.error is not None:
                raise EngineFailure(f"the engine failed on request {self.job.request_id}: {self.job.error}")
            yield event
            if isinstance(event, Finished):
                return
