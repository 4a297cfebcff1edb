"""The request layer shared by every engine and front end: lease, template, tokens, queue, events.

`GenerationService.stream` turns one `GenerationRequest` into events (`Started`, `TextPiece`...,
`Finished`). It decides everything a servicer only translates: which adapter version serves the
request (a registry lease held until the engine has let go of the job), rendering `inputs`
through the adapter's template, the context-length check, the bounded queue (max_batch running +
max_queue waiting, then Overloaded). Rendering and tokenizing run in a worker thread, on a prompt
whose size is bounded (`max_prompt_bytes`): onnxruntime-genai's tokenizer holds the GIL while it
works, so only the bound keeps it short enough for health checks and other requests to be
answered meanwhile. The output side of a request (text, stop strings, timings)
is its `RequestState`. A client that goes away (cancel, deadline) stops the job; its slot is free
once the engine reports the job finished.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace

from loraplex.adapters.package.template import TemplateError
from loraplex.runtime.engines.base import Engine, FinishReason, SamplingParams, TokenLogprobs
from loraplex.runtime.errors import InvalidRequest, LoraplexError, Overloaded, ShuttingDown
from loraplex.runtime.server.metrics import ServerMetrics
from loraplex.runtime.server.mixes import DEFAULT_MAX_MIXES, MIX_PREFIX, Mixes
from loraplex.runtime.server.registry import AdapterRegistry, AdapterVersion
from loraplex.runtime.server.request_state import Finished, RequestState, Started, TextPiece
from loraplex.runtime.server.tokenizer import TextTokenizer
from loraplex.runtime.server.validation import prompt_input
from loraplex.runtime.server.validation import text as checked_text

log = logging.getLogger(__name__)


@dataclass
class GenerationRequest:
    adapter: str = ""  # "" = base model
    prompt: str | None = None
    inputs: Mapping[str, str] | None = None  # rendered through the adapter's prompt template
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    # False: no output constraint unless `params.constraint` has one (opt out of the adapter's default).
    default_output: bool = True
    # A weighted adapter mix ((name, weight), validated) instead of `adapter`; see `mixes`.
    mix: tuple[tuple[str, float], ...] = ()


@dataclass
class GenerationResult:
    """A whole completion (what `Generate` returns)."""

    text: str
    token_ids: list[int]
    started: Started
    finished: Finished
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per token id, when asked for


class GenerationService:
    def __init__(self, engine: Engine, registry: AdapterRegistry, tokenizer: TextTokenizer, context_length: int,
                 metrics: ServerMetrics, *, max_batch: int, max_queue: int, max_prompt_bytes: int,
                 max_mixes: int = DEFAULT_MAX_MIXES):
        self.engine = engine
        self.registry = registry
        self.mixes = Mixes(registry, max_mixes)
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_prompt_bytes = max_prompt_bytes
        self.draining = False
        self._requests: set[RequestState] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        metrics.in_flight.set_function(lambda: len(self._requests))
        metrics.queue_depth.set_function(lambda: sum(1 for r in list(self._requests) if r.job.started_at is None))

    @property
    def in_flight(self) -> int:
        return len(self._requests)

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no request is in flight (drain); False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    # -- prompt ---------------------------------------------------------------------------
    def render(self, version: AdapterVersion, prompt: str | None, inputs: Mapping[str, str] | None) -> str:
        if inputs is not None:
            if version.template is None:
                if version.name.startswith(MIX_PREFIX):
                    raise InvalidRequest("this mix has no task template (its adapters do not share one): render "
                                         "the prompt with the template you want and send `prompt` instead of `inputs`")
                what = f"adapter {version.name!r}" if version.name else "the base model"
                raise InvalidRequest(f"{what} has no task template; send `prompt` instead of `inputs`")
            try:
                rendered = version.template.render_prompt(inputs, where="inputs.fields")
            except TemplateError as exc:
                raise InvalidRequest(str(exc)) from exc
            return checked_text("the prompt rendered from inputs", rendered, max_bytes=self.max_prompt_bytes)
        if not prompt:
            raise InvalidRequest("the request has neither `prompt` nor `inputs`; set one of them")
        return prompt

    async def tokenize(self, adapter: str, prompt: str | None, inputs: Mapping[str, str] | None
                       ) -> tuple[str, list[int]]:
        prompt, inputs = prompt_input(prompt, inputs, self.max_prompt_bytes)
        with await self.registry.lease(adapter) as lease:
            text = self.render(lease.version, prompt, inputs)
        return text, await asyncio.to_thread(self.tokenizer.encode, text)

    def _prompt_ids(self, version: AdapterVersion, prompt: str | None, inputs: Mapping[str, str] | None) -> list[int]:
        """Render and tokenize the prompt (in a worker thread); the engine's `submit` checks the ids."""
        return self.tokenizer.encode(self.render(version, prompt, inputs))

    # -- generation -----------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> GenerationResult:
        pieces: list[str] = []
        ids: list[int] = []
        logprobs: list[TokenLogprobs] = []
        started = finished = None
        async for event in self.stream(request):
            if isinstance(event, Started):
                started = event
            elif isinstance(event, TextPiece):
                pieces.append(event.text)
                ids.extend(event.token_ids)
                logprobs.extend(event.logprobs)
            else:
                finished = event
        assert started is not None and finished is not None
        return GenerationResult("".join(pieces), ids, started, finished, logprobs)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Started | TextPiece | Finished]:
        if self.draining:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        received = time.monotonic()
        prompt, inputs = prompt_input(request.prompt, request.inputs, self.max_prompt_bytes)
        lease = await (self.mixes.lease(request.mix) if request.mix else self.registry.lease(request.adapter))
        state: RequestState | None = None
        status = "UNKNOWN"
        try:
            prompt_ids = await asyncio.to_thread(self._prompt_ids, lease.version, prompt, inputs)
            if len(self._requests) >= self.max_batch + self.max_queue:
                raise Overloaded(
                    f"{len(self._requests)} requests in flight fill the queue (max_batch {self.max_batch} + "
                    f"max_queue {self.max_queue}); retry later or raise --max-queue"
                )
            room = max(self.context_length - len(prompt_ids), 0)  # none: the engine refuses the prompt
            params = replace(request.params, max_new_tokens=min(request.params.max_new_tokens, room))
            if params.constraint is None and request.default_output and lease.version.output is not None:
                params = replace(params, constraint=lease.version.output)
            state = RequestState(
                request_id=request.request_id or uuid.uuid4().hex[:16], prompt_ids=prompt_ids, params=params,
                lease=lease, tokenizer=self.tokenizer, metrics=self.metrics, received=received,
                on_done=self._request_done,
            )
            self._submit(state)
            yield Started(state.adapter, lease.version.version, state.job.request_id, len(prompt_ids))
            async for event in state.events():
                yield event
            status = "OK"
        except (asyncio.CancelledError, GeneratorExit):
            status = "CANCELLED"
            raise
        except LoraplexError as exc:
            status = exc.code
            raise
        except Exception:
            status = "INTERNAL"
            raise
        finally:
            if state is None:
                lease.release()
            elif status != "OK" and not state.job.stopped:
                state.job.stop(FinishReason.CANCELLED)
            self.metrics.requests.labels(lease.version.name, status).inc()

    def _submit(self, state: RequestState) -> None:
        self._requests.add(state)
        self._idle.clear()
        try:
            self.engine.submit(state.job)
        except BaseException:
            self._request_done(state)
            raise

    def _request_done(self, state: RequestState) -> None:
        """On the loop, once the engine let go of the job: free its place and its adapter lease."""
        self._requests.discard(state)
        state.lease.release()
        if not self._requests:
            self._idle.set()
