"""gRPC servicers: translate between the proto messages and the library, nothing more.

Decisions live in GenerationService and AdapterRegistry; errors are mapped to status codes by
`loraplex.runtime.errors.status_code` (the one place), applied here by `_translating`.
"""

from __future__ import annotations

import functools
import hmac
import logging
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import grpc
from loraplex.runtime.engine import FinishReason
from loraplex.runtime.errors import LoraplexError, ShuttingDown, Unauthenticated, status_code
from loraplex.runtime.generation import (
    Finished,
    GenerationRequest,
    GenerationService,
    Started,
    TextPiece,
)
from loraplex.runtime.metrics import ServerMetrics
from loraplex.runtime.package import PackageInfo
from loraplex.runtime.registry import AdapterRegistry, AdapterVersion
from loraplex.runtime.validation import request_id, sampling_params
from loraplex.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc

log = logging.getLogger(__name__)

FINISH_REASONS = {
    FinishReason.LENGTH: generation_pb2.LENGTH,
    FinishReason.STOP: generation_pb2.STOP,
    FinishReason.EOS: generation_pb2.EOS,
    FinishReason.CANCELLED: generation_pb2.CANCELLED,
}


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, rpc: str) -> None:
    code = status_code(exc)
    if not isinstance(exc, LoraplexError):
        log.exception("%s failed", rpc, exc_info=exc)
    await context.abort(code, str(exc) or type(exc).__name__)


def _translating(method: Callable) -> Callable:
    """Unary RPCs: library errors -> gRPC status."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except (LoraplexError, ValueError) as exc:
            await _abort(context, exc, method.__name__)

    return wrapper


class _Ready:
    """Requests before the model is loaded and warm (or while draining) get UNAVAILABLE."""

    service: GenerationService | None = None

    def ready(self) -> GenerationService:
        if self.service is None:
            raise ShuttingDown("the server is still loading its model; retry when health says SERVING")
        return self.service


class GenerationServicer(generation_pb2_grpc.GenerationServicer, _Ready):
    def __init__(self, package: PackageInfo, info: dict[str, Any]):
        self.package = package
        self.info = info  # engine, device, provider, max_batch, max_queue

    def _request(self, request: generation_pb2.GenerateRequest) -> GenerationRequest:
        p = request.params
        params = sampling_params(
            max_new_tokens=p.max_new_tokens,
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k,
            seed=p.seed if p.HasField("seed") else None,
            repetition_penalty=p.repetition_penalty,
            stop=list(p.stop),
            ignore_eos=p.ignore_eos,
            context_length=self.package.context_length,
        )
        which = request.WhichOneof("input")
        return GenerationRequest(
            adapter=request.adapter,
            prompt=request.prompt if which == "prompt" else None,
            inputs=dict(request.inputs.fields) if which == "inputs" else None,
            params=params,
            request_id=request_id(request.request_id),
        )

    @_translating
    async def Generate(self, request, context):
        result = await self.ready().generate(self._request(request))
        s, f = result.started, result.finished
        return generation_pb2.GenerateResponse(
            text=result.text,
            token_ids=result.token_ids,
            finish_reason=FINISH_REASONS[f.reason],
            usage=_usage(f),
            adapter=s.adapter,
            adapter_version=s.adapter_version,
            timings=_timings(f),
            request_id=s.request_id,
        )

    async def GenerateStream(self, request, context):
        try:
            async for event in self.ready().stream(self._request(request)):
                if isinstance(event, Started):
                    yield generation_pb2.GenerateChunk(
                        adapter=event.adapter, adapter_version=event.adapter_version, request_id=event.request_id
                    )
                elif isinstance(event, TextPiece):
                    yield generation_pb2.GenerateChunk(text=event.text, token_ids=event.token_ids)
                elif isinstance(event, Finished):
                    yield generation_pb2.GenerateChunk(
                        finish_reason=FINISH_REASONS[event.reason], usage=_usage(event), timings=_timings(event)
                    )
        except (LoraplexError, ValueError) as exc:
            await _abort(context, exc, "GenerateStream")

    @_translating
    async def Tokenize(self, request, context):
        which = request.WhichOneof("input")
        text, ids = self.ready().tokenize(
            request.adapter,
            request.prompt if which == "prompt" else None,
            dict(request.inputs.fields) if which == "inputs" else None,
        )
        return generation_pb2.TokenizeResponse(token_ids=ids, text=text)

    @_translating
    async def ModelInfo(self, request, context):
        m = self.package.manifest
        return generation_pb2.ModelInfoResponse(
            architecture=m.base.architecture,
            model_type=m.base.model_type,
            precision=m.precision,
            device=self.info["device"],
            provider=self.info["provider"],
            engine=self.info["engine"],
            context_length=self.package.context_length,
            vocab_size=self.package.vocab_size,
            lora_rank=m.lora_rank,
            lora_modules=m.lora_modules,
            adapters=self.ready().registry.names(),
            max_batch=self.info["max_batch"],
            max_queue=self.info["max_queue"],
            version=_loraplex_version(),
        )


class AdaptersServicer(adapters_pb2_grpc.AdaptersServicer, _Ready):
    def __init__(self, metrics: ServerMetrics, auth_token: str | None = None):
        self.metrics = metrics
        self.auth_token = auth_token

    def _registry(self) -> AdapterRegistry:
        return self.ready().registry

    def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if self.auth_token is None:
            return
        metadata = dict(context.invocation_metadata() or ())
        given = metadata.get("authorization", "")
        expected = f"Bearer {self.auth_token}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            what = "no bearer token" if not given else "a wrong bearer token"
            raise Unauthenticated(
                f"admin call with {what}: send metadata 'authorization: Bearer <token>' "
                "with the token in the server's --auth-token-file"
            )

    @_translating
    async def List(self, request, context):
        return adapters_pb2.ListAdaptersResponse(adapters=[_adapter_info(v) for v in self._registry().versions()])

    async def Load(self, request, context):
        return await self._admin("load", self._load, request, context)

    async def Unload(self, request, context):
        return await self._admin("unload", self._unload, request, context)

    async def _load(self, request, context):
        version = await self._registry().load(request.name, request.path, request.version or None)
        self.metrics.loaded_adapters.set(len(self._registry().names()))
        return _adapter_info(version)

    async def _unload(self, request, context):
        version = await self._registry().unload(request.name, wait=not request.no_wait)
        self.metrics.loaded_adapters.set(len(self._registry().names()))
        return adapters_pb2.UnloadAdapterResponse(
            name=version.name, version=version.version, requests_served=version.served
        )

    async def _admin(self, action: str, handler, request, context):
        try:
            self._authorize(context)
            response = await handler(request, context)
        except (LoraplexError, ValueError) as exc:
            self.metrics.adapter_loads.labels(action, status_code(exc).name).inc()
            await _abort(context, exc, action)
        self.metrics.adapter_loads.labels(action, "OK").inc()
        return response


def _adapter_info(v: AdapterVersion) -> adapters_pb2.AdapterInfo:
    info = adapters_pb2.AdapterInfo(
        name=v.name,
        version=v.version,
        rank=v.rank,
        target_modules=v.target_modules,
        size_bytes=v.size_bytes,
        requests_served=v.served,
        sha256=v.sha256,
        in_flight=v.leases,
    )
    if v.template is not None:
        info.template.prompt = v.template.prompt
        info.template.completion = v.template.completion
    return info


def _usage(f: Finished) -> generation_pb2.Usage:
    return generation_pb2.Usage(prompt_tokens=f.prompt_tokens, completion_tokens=f.completion_tokens)


def _timings(f: Finished) -> generation_pb2.Timings:
    t = f.timings
    return generation_pb2.Timings(
        queue_ms=t.queue_ms, time_to_first_token_ms=t.time_to_first_token_ms, total_ms=t.total_ms
    )


def _loraplex_version() -> str:
    try:
        return version("loraplex")
    except PackageNotFoundError:
        return "unknown"
