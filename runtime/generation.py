"""The request layer shared by every engine: adapter lease, template, tokens, queue, streaming text.

`GenerationService.stream` turns one `GenerationRequest` into events (`Started`, `TextPiece`...,
`Finished`). It decides everything the servicer only translates: which adapter version serves
the request (a registry lease held until the engine has let go of the job), rendering
`TaskInputs` through the adapter's template, the context-length check, the bounded queue
(max_batch running + max_queue waiting, then Overloaded), UTF-8 safe text pieces, stop strings,
timings and metrics. A client that goes away (cancel, deadline) stops the job; its slot is free
once the engine reports the job finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace

from loraplex.runtime.detokenizer import IncrementalDetokenizer, StopMatcher
from loraplex.runtime.engine import Engine, FinishReason, GenerationJob, SamplingParams
from loraplex.runtime.errors import EngineFailure, InvalidRequest, LoraplexError, Overloaded, ShuttingDown
from loraplex.runtime.metrics import ServerMetrics
from loraplex.runtime.registry import AdapterRegistry, AdapterVersion, Lease
from loraplex.runtime.tokenizer import TextTokenizer
from loraplex.trainer.template import TemplateError

log = logging.getLogger(__name__)


@dataclass
class GenerationRequest:
    adapter: str = ""  # "" = base model
    prompt: str | None = None
    inputs: Mapping[str, str] | None = None  # rendered through the adapter's prompt template
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""


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


@dataclass
class GenerationResult:
    """A whole completion (what `Generate` returns)."""

    text: str
    token_ids: list[int]
    started: Started
    finished: Finished


class GenerationService:
    def __init__(
        self,
        engine: Engine,
        registry: AdapterRegistry,
        tokenizer: TextTokenizer,
        context_length: int,
        metrics: ServerMetrics,
        *,
        max_batch: int,
        max_queue: int,
    ):
        self.engine = engine
        self.registry = registry
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.draining = False
        self._jobs: set[GenerationJob] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        metrics.in_flight.set_function(lambda: len(self._jobs))
        metrics.queue_depth.set_function(lambda: sum(1 for j in list(self._jobs) if j.started_at is None))

    @property
    def in_flight(self) -> int:
        return len(self._jobs)

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no job is in flight (drain); False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    # -- prompt ---------------------------------------------------------------------------
    def render(self, version: AdapterVersion, prompt: str | None, inputs: Mapping[str, str] | None) -> str:
        if inputs is not None:
            if version.template is None:
                what = f"adapter {version.name!r}" if version.name else "the base model"
                raise InvalidRequest(f"{what} has no task template; send `prompt` instead of `inputs`")
            try:
                return version.template.render_prompt(inputs, where="inputs.fields")
            except TemplateError as exc:
                raise InvalidRequest(str(exc)) from exc
        if not prompt:
            raise InvalidRequest("the request has neither `prompt` nor `inputs`; set one of them")
        return prompt

    def tokenize(self, adapter: str, prompt: str | None, inputs: Mapping[str, str] | None) -> tuple[str, list[int]]:
        with self.registry.acquire(adapter) as lease:
            text = self.render(lease.version, prompt, inputs)
        return text, self.tokenizer.encode(text)

    def _prompt_ids(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        if not ids:
            raise InvalidRequest("the prompt encodes to no tokens; send a non-empty prompt")
        if len(ids) >= self.context_length:
            raise InvalidRequest(
                f"the prompt is {len(ids)} tokens; the model's context length is {self.context_length}: "
                "shorten the prompt"
            )
        return ids

    # -- generation -----------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> GenerationResult:
        pieces: list[str] = []
        ids: list[int] = []
        started = finished = None
        async for event in self.stream(request):
            if isinstance(event, Started):
                started = event
            elif isinstance(event, TextPiece):
                pieces.append(event.text)
                ids.extend(event.token_ids)
            else:
                finished = event
        assert started is not None and finished is not None
        return GenerationResult("".join(pieces), ids, started, finished)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Started | TextPiece | Finished]:
        if self.draining:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        received = time.monotonic()
        request_id = request.request_id or uuid.uuid4().hex[:16]
        lease = self.registry.acquire(request.adapter)
        adapter = lease.version.name
        status, job = "UNKNOWN", None
        try:
            prompt_ids = self._prompt_ids(self.render(lease.version, request.prompt, request.inputs))
            if len(self._jobs) >= self.max_batch + self.max_queue:
                raise Overloaded(
                    f"{len(self._jobs)} requests in flight fill the queue (max_batch {self.max_batch} + "
                    f"max_queue {self.max_queue}); retry later or raise --max-queue"
                )
            room = self.context_length - len(prompt_ids)
            params = replace(request.params, max_new_tokens=min(request.params.max_new_tokens, room))
            events: asyncio.Queue = asyncio.Queue()
            job = self._submit(request_id, prompt_ids, params, lease, events, received)
            yield Started(adapter, lease.version.version, request_id, len(prompt_ids))
            while True:
                event = await events.get()
                if isinstance(event, Finished):
                    if job.error is not None:
                        raise EngineFailure(f"the engine failed on request {request_id}: {job.error}")
                    status = "OK"
                    yield event
                    return
                yield event
        except (asyncio.CancelledError, GeneratorExit):
            status = "CANCELLED"
            raise
        except LoraplexError as exc:
            status = exc.code.name
            raise
        except Exception:
            status = "INTERNAL"
            raise
        finally:
            if job is None:
                lease.release()
            elif not job.stopped and status != "OK":
                job.stop(FinishReason.CANCELLED)
            self.metrics.requests.labels(adapter, status).inc()

    def _submit(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        lease: Lease,
        events: asyncio.Queue,
        received: float,
    ) -> GenerationJob:
        loop = asyncio.get_running_loop()
        adapter = lease.version.name
        detok = IncrementalDetokenizer(self.tokenizer)
        stops = StopMatcher(params.stop)
        state = {"first": None, "last": None, "held": []}
        job: GenerationJob

        def on_loop(callback, *args) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone (server stopped): nobody listens
                loop.call_soon_threadsafe(callback, *args)

        def emit(event: object) -> None:
            on_loop(events.put_nowait, event)

        def sink(token: int | None, finish: FinishReason | None) -> None:  # the engine's thread
            now = time.monotonic()
            if token is not None:
                if state["first"] is None:
                    state["first"] = now
                    self.metrics.ttft.labels(adapter).observe(now - received)
                else:
                    self.metrics.token_latency.labels(adapter).observe(now - state["last"])
                state["last"] = now
                state["held"].append(token)
                text = stops.feed(detok.push(token))
                if stops.stopped:
                    job.stop(FinishReason.STOP)
                if text:
                    emit(TextPiece(text, state["held"]))
                    state["held"] = []
                return
            tail = "" if stops.stopped else stops.feed(detok.flush()) + stops.flush()
            if tail or state["held"]:
                emit(TextPiece(tail, state["held"]))
            completion = len(detok.tokens)
            started = job.started_at or now
            timings = Timings(
                queue_ms=(started - job.submitted_at) * 1000,
                time_to_first_token_ms=((state["first"] or now) - received) * 1000,
                total_ms=(now - received) * 1000,
            )
            reason = FinishReason.STOP if stops.stopped else (finish or FinishReason.CANCELLED)
            self.metrics.tokens.labels(adapter, "OK" if job.error is None else "INTERNAL").inc(completion)
            self.metrics.prompt_tokens.labels(adapter).inc(len(prompt_ids))
            finished = Finished(reason, len(prompt_ids), completion, timings)
            on_loop(self._job_done, job, lease, events, finished)  # slot freed before the client hears

        job = GenerationJob(request_id, prompt_ids, params, lease.version.handle, sink)
        self._jobs.add(job)
        self._idle.clear()
        try:
            self.engine.submit(job)
        except Exception:
            self._job_done(job, lease)
            raise
        return job

    def _job_done(
        self, job: GenerationJob, lease: Lease, events: asyncio.Queue | None = None, finished: Finished | None = None
    ) -> None:
        """On the loop, once the engine let go of the job: free its slot and its adapter lease."""
        self._jobs.discard(job)
        lease.release()
        if not self._jobs:
            self._idle.set()
        if events is not None:
            events.put_nowait(finished)
