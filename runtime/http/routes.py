"""The OpenAI-compatible routes (a Starlette app) over the server's `GenerationService`.

    GET  /v1/models, /v1/models/{id}     the base model (`HttpState.base_id`) and every loaded adapter
    POST /v1/completions                 prompt (or the `inputs` extension) -> text
    POST /v1/chat/completions            messages, rendered with the package's chat template -> text
    POST /v1/classify                    prompt (or `inputs`) -> every label's probability (loraplex's own)
    GET  /health                         200 while serving, 503 while loading or draining
    GET  /metrics                        the server's Prometheus registry (the one --metrics-port serves)

Every route runs through `_route`: the bearer token where `BearerAuth.guards_route` says so, then
the handler, whose errors become statuses in `errors.error_response` (the one translation point).
A generation is tied to its HTTP connection: when the client goes away (closed, timed out) the
request's task is cancelled, which stops the engine job and frees its row and adapter lease, as a
cancelled gRPC call does. Streams are server-sent events in OpenAI's chunk format, ending with
`data: [DONE]`; an error after the stream started arrives as one `data: {"error": ...}` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from loraplex.runtime.errors import AdapterNotFound, InvalidRequest, LoraplexError, ShuttingDown, quoted
from loraplex.runtime.http import translation
from loraplex.runtime.http.errors import error_body, error_response
from loraplex.runtime.server import fanout
from loraplex.runtime.server.auth import BearerAuth
from loraplex.runtime.server.generation import GenerationResult, GenerationService
from loraplex.runtime.server.metrics import ServerMetrics
from loraplex.runtime.server.registry import BASE_NAME, residency
from loraplex.runtime.server.request_state import Finished, Started, TextPiece
from loraplex.runtime.server.tokenizer import ChatTemplateError
from loraplex.runtime.server.validation import mix as checked_mix
from loraplex.runtime.server.validation import request_id as checked_request_id
from loraplex.runtime.server.validation import text as checked_text
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 * 1024 * 1024  # what gRPC accepts in one message
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}

Events = AsyncIterator[tuple[int, Started | TextPiece | Finished]]  # tagged with the sample's index


@dataclass
class HttpState:
    """What the routes need from the server; `service` is set once the model is warm."""

    base_id: str  # the `model` id of the base model (no adapter)
    context_length: int
    max_prompt_bytes: int
    metrics: ServerMetrics
    chat_prompt: Callable[[list[dict[str, str]]], str] | None  # None: the package has no chat template
    auth: BearerAuth | None = None
    service: GenerationService | None = None
    serving: bool = False  # mirrors the gRPC health status
    created: int = 0  # `created` of the model cards: when the server started

    def ready(self) -> GenerationService:
        if self.service is None:
            raise ShuttingDown("the server is still loading its model; retry when /health answers 200")
        return self.service

    def adapter(self, model: str, resolvable: bool = True) -> str:
        """The adapter name a `model` id stands for (the base model: BASE_NAME). With `resolvable`, a
        name the adapter stores may hold passes (the request path resolves it, or says NOT_FOUND)."""
        if model == self.base_id:
            return BASE_NAME
        registry = self.ready().registry
        names = registry.names()
        if model not in names and not (resolvable and registry.may_resolve(model)):
            listed = ", ".join([self.base_id, *names[:20]]) + (" ..." if len(names) > 20 else "")
            raise AdapterNotFound(f"model {quoted(model)} is not served here; models: {listed} (GET /v1/models)")
        return model


def build_app(state: HttpState) -> Starlette:
    routes = [
        Route("/v1/models", _route(state, _models), methods=["GET"]),
        Route("/v1/models/{model:path}", _route(state, _model), methods=["GET"]),
        Route("/v1/completions", _route(state, _generation("completion")), methods=["POST"]),
        Route("/v1/chat/completions", _route(state, _generation("chat")), methods=["POST"]),
        Route("/v1/classify", _route(state, _classify), methods=["POST"]),
        Route("/health", _route(state, _health), methods=["GET"]),
        Route("/metrics", _route(state, _metrics), methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_exception})


Handler = Callable[[HttpState, Request], Awaitable[Response]]


def _route(state: HttpState, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            if state.auth is not None and state.auth.guards_route(request.url.path):
                state.auth.check([(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw])
            return await handler(state, request)
        except Exception as exc:
            return error_response(exc, f"{request.method} {request.url.path}")

    return endpoint


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 / 405 in OpenAI's error shape."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    what = "no such route" if status == 404 else f"{request.method} is not allowed here" if status == 405 else "error"
    body = {"error": {"message": f"{what}: {request.method} {request.url.path}", "type": "invalid_request_error",
                      "param": None, "code": "NOT_FOUND" if status == 404 else "UNIMPLEMENTED"}}
    return JSONResponse(body, status_code=status)


# -- routes -----------------------------------------------------------------------------------
async def _health(state: HttpState, request: Request) -> Response:
    serving = state.serving and state.service is not None and not state.service.draining
    return JSONResponse({"status": "SERVING" if serving else "NOT_SERVING"}, status_code=200 if serving else 503)


async def _metrics(state: HttpState, request: Request) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def _models(state: HttpState, request: Request) -> Response:
    return JSONResponse({"object": "list", "data": _cards(state)})


async def _model(state: HttpState, request: Request) -> Response:
    model = request.path_params["model"]
    state.adapter(model, resolvable=False)  # NOT_FOUND naming the models
    return JSONResponse(next(card for card in _cards(state) if card["id"] == model))


def _cards(state: HttpState) -> list[dict[str, Any]]:
    registry = state.ready().registry
    cards = [translation.model_card(state.base_id, state.created, version="base")]
    for v in registry.versions():
        fields = v.template.prompt_fields if v.template is not None else ()
        card = translation.model_card(v.name, state.created, version=v.version, parent=state.base_id,
                                      fields=fields, output=v.output.to_dict() if v.output else None)
        if (where := residency(registry.engine, v)) is not None:  # loraplex's: where its weights are
            card["residency"] = {"tier": where.tier, "host_bytes": where.nbytes, "loads": where.loads,
                                 "evictions": where.evictions, "pinned": where.pinned}
        cards.append(card)
    return cards


def _generation(kind: translation.Kind) -> Handler:
    async def handle(state: HttpState, request: Request) -> Response:
        service = state.ready()
        rid = checked_request_id(request.headers.get("x-request-id", "")) or uuid.uuid4().hex[:16]
        call = translation.parse_call(kind, await _json_body(request), context_length=state.context_length,
                                      max_prompt_bytes=state.max_prompt_bytes, request_id=rid)
        call.request.adapter = state.adapter(call.model)
        if call.request.mix:  # a mix replaces the adapter: `model` must then be the base model's id
            checked_mix(call.request.mix, call.request.adapter)
        if call.messages is not None:
            call.request.prompt = await _chat_prompt(state, call.messages)
        events = _events(service, call)
        streaming = False
        try:
            _, started = await anext(events)  # admitted: refusals (queue full, draining, prompt too long) raise here
            assert isinstance(started, Started)
            headers = {"x-request-id": started.request_id}
            if call.stream:
                streaming = True
                return EventStream(call, started, events, headers, _token_bytes(service))  # closes `events`
            results = await _until_disconnected(_collect(call.n, started, events), request.receive)
        finally:
            if not streaming:
                await events.aclose()
        if results is None:  # the client went away: the job is stopped, nobody reads an answer
            return Response(status_code=499)
        return _json(translation.response(call, results, _token_bytes(service)), headers)

    return handle


async def _chat_prompt(state: HttpState, messages: list[dict[str, str]]) -> str:
    if state.chat_prompt is None:
        raise InvalidRequest("the package's base model has no chat template (chat_template.jinja or the chat_template "
                             "of tokenizer_config.json), so messages cannot become a prompt: use /v1/completions, or "
                             "export the package from a base model that has a chat template", field="messages")
    try:  # the renderer holds the GIL; the messages' size is bounded, so this stays short
        prompt = await asyncio.to_thread(state.chat_prompt, messages)
    except ChatTemplateError as exc:
        raise InvalidRequest(f"the chat template refused the messages: {exc}", field="messages") from exc
    return checked_text("the prompt rendered from messages", prompt, max_bytes=state.max_prompt_bytes)


async def _json_body(request: Request) -> Any:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise InvalidRequest(f"the request body is {declared} bytes; at most {MAX_BODY_BYTES} are accepted")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise InvalidRequest(f"the request body is over {MAX_BODY_BYTES} bytes; shorten it")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks), parse_constant=_refuse_constant)
    except ValueError as exc:
        raise InvalidRequest(f"the request body is not JSON ({exc}); send a JSON object") from None


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _events(service: GenerationService, call: translation.OpenAICall) -> Events:
    """The call's events tagged with their sample's index (one sample: the request's own stream)."""
    return fanout.samples(service, call.request, call.n) if call.n > 1 else _tagged(service.stream(call.request))


async def _tagged(events: AsyncIterator[Started | TextPiece | Finished]) -> Events:
    try:
        async for event in events:
            yield 0, event
    finally:
        await events.aclose()  # type: ignore[attr-defined]


def _token_bytes(service: GenerationService) -> translation.TokenBytes:
    tokenizer = service.tokenizer
    own = getattr(tokenizer, "token_bytes", None)
    return own if own is not None else (lambda token: tokenizer.decode([token]).encode("utf-8"))


async def _collect(n: int, started: Started, events: Events) -> list[GenerationResult]:
    """Every sample's whole completion. Reads `events` to its end: a stream left at its last yield
    would count the request as cancelled."""
    pieces: list[list[str]] = [[] for _ in range(n)]
    ids: list[list[int]] = [[] for _ in range(n)]
    logprobs: list[list] = [[] for _ in range(n)]
    firsts: dict[int, Started] = {0: started}
    results: dict[int, GenerationResult] = {}
    async for i, event in events:
        if isinstance(event, Started):
            firsts.setdefault(i, event)
        elif isinstance(event, TextPiece):
            pieces[i].append(event.text)
            ids[i].extend(event.token_ids)
            logprobs[i].extend(event.logprobs)
        elif isinstance(event, Finished):
            results[i] = GenerationResult("".join(pieces[i]), ids[i], firsts.get(i, started), event, logprobs[i])
    assert len(results) == n, "the request's events ended without Finished"
    return [results[i] for i in range(n)]


async def _classify(state: HttpState, request: Request) -> Response:
    """POST /v1/classify: {model, prompt | inputs, labels?} -> each label's probability, most probable first."""
    service = state.ready()
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    unknown = sorted(set(body) - {"model", "prompt", "inputs", "labels", "user"})
    if unknown:
        raise InvalidRequest(f"unknown field {quoted(unknown[0], 64)} for /v1/classify; remove it", field=unknown[0])
    model = body.get("model")
    if not isinstance(model, str):
        raise InvalidRequest("model is missing; GET /v1/models lists the ids to send", field="model")
    labels = body.get("labels") or []
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise InvalidRequest("labels must be a list of strings", field="labels")
    prompt, inputs = translation.prompt_or_inputs(body)
    rid = checked_request_id(request.headers.get("x-request-id", "")) or uuid.uuid4().hex[:16]
    result = await fanout.classify(service, state.adapter(checked_text("model", model)), prompt, inputs, labels, rid)
    return _json({"id": "cls-" + rid, "object": "classification", "model": model,
                  "labels": [{"label": x.label, "probability": x.probability, "logprob": x.logprob,
                              "tokens": x.tokens} for x in result.labels],
                  "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.scored_tokens,
                            "total_tokens": result.prompt_tokens + result.scored_tokens},
                  "loraplex": {"adapter": result.started.adapter, "adapter_version": result.started.adapter_version,
                               "request_id": rid, "timings": {"queue_ms": result.queue_ms,
                                                              "total_ms": result.total_ms}}},
                 {"x-request-id": rid})


async def _until_disconnected(work: Awaitable[Any], receive: Receive) -> Any:
    """`work`'s result, or None once the client has gone (then `work` is cancelled, which stops the job)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watcher):
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pending
    return task.result() if not task.cancelled() else None


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone (the body was read before: only disconnects arrive)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _json(body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body, ensure_ascii=False, separators=(",", ":")), media_type="application/json",
                    headers=headers)


class EventStream(Response):
    """A generation streamed as server-sent events, stopped when the client goes away."""

    media_type = "text/event-stream"

    def __init__(self, call: translation.OpenAICall, started: Started, events: Events, headers: dict[str, str],
                 token_bytes: translation.TokenBytes):
        self.call, self.started, self.events, self.token_bytes = call, started, events, token_bytes
        self.status_code = 200
        self.background = None
        self.init_headers({**SSE_HEADERS, **headers})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await _until_disconnected(self._send_all(send), receive)
        finally:
            await self.events.aclose()  # a stream left at a yield: GeneratorExit stops the job

    async def _send_all(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        try:
            async for data in self._chunks():
                await send({"type": "http.response.body", "body": data, "more_body": True})
        except Exception as exc:  # after the stream started: one error event, then [DONE]
            if not isinstance(exc, LoraplexError):
                log.error("%s stream %s failed", self.call.kind, self.call.id, exc_info=exc)
            await send({"type": "http.response.body", "body": _sse(error_body(exc)), "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    async def _chunks(self) -> AsyncIterator[bytes]:
        call = self.call
        if call.kind == "chat":
            for index in range(call.n):
                yield _sse(translation.chunk(call, role=True, index=index))
        offsets = [0] * call.n  # characters sent per choice (completions' text_offset)
        finished: list[Finished] = []
        async for index, event in self.events:
            if isinstance(event, TextPiece):
                if event.text or event.logprobs:
                    scores = translation.logprobs_json(call, event.token_ids, event.logprobs, self.token_bytes,
                                                       offsets[index])
                    offsets[index] += len(event.text)
                    yield _sse(translation.chunk(call, event.text, index=index, logprobs=scores))
            elif isinstance(event, Finished):
                finished.append(event)
                last = translation.chunk(call, finished=event, index=index)
                last["loraplex"] = translation.extension(self.started, event)
                yield _sse(last)
        if call.include_usage and finished:
            total = sum(f.completion_tokens for f in finished)
            yield _sse(translation.usage_chunk(call, self.started, finished[0], total))


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"

