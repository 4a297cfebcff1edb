"""gRPC servicers: translate between the proto messages and the library, nothing more.

Decisions live in GenerationService and AdapterRegistry; errors become statuses in
`status.ServingInterceptor` and tokens are checked there too. Until the model is loaded and warm
(and again while draining) every call gets UNAVAILABLE.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from loraplex.adapters.package.manifest import Accuracy, Manifest
from loraplex.adapters.package.output import OutputConstraint
from loraplex.runtime.engines.adapter_cache import Residency
from loraplex.runtime.engines.base import FinishReason, TokenLogprobs
from loraplex.runtime.errors import InvalidRequest, ShuttingDown, status_name
from loraplex.runtime.server import fanout
from loraplex.runtime.server.generation import GenerationRequest, GenerationResult, GenerationService
from loraplex.runtime.server.metrics import ServerMetrics
from loraplex.runtime.server.registry import AdapterVersion, residency
from loraplex.runtime.server.request_state import Finished, Started, TextPiece
from loraplex.runtime.server.validation import (
    adapter_version,
    output_constraint,
    request_id,
    samples,
    sampling_params,
    text,
)
from loraplex.runtime.server.validation import mix as checked_mix
from loraplex.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc

FINISH_REASONS = {
    FinishReason.LENGTH: generation_pb2.LENGTH,
    FinishReason.STOP: generation_pb2.STOP,
    FinishReason.EOS: generation_pb2.EOS,
    FinishReason.CANCELLED: generation_pb2.CANCELLED,
}


class _Ready:
    """Holds the service once the server is warm."""

    service: GenerationService | None = None

    def ready(self) -> GenerationService:
        if self.service is None:
            raise ShuttingDown("the server is still loading its model; retry when health says SERVING")
        return self.service


class GenerationServicer(generation_pb2_grpc.GenerationServicer, _Ready):
    def __init__(self, manifest: Manifest, context_length: int, vocab_size: int, info: dict[str, Any]):
        self.manifest = manifest
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.info = info  # engine, device, provider, max_batch, max_queue

    def _input(self, request) -> tuple[str, str | None, dict[str, str] | None]:
        """(adapter, prompt, inputs) of a GenerateRequest or TokenizeRequest, checked."""
        which = request.WhichOneof("input")
        prompt = request.prompt if which == "prompt" else None
        inputs = dict(request.inputs.fields) if which == "inputs" else None
        return text("adapter", request.adapter), prompt, inputs

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
            logprobs=p.logprobs if p.HasField("logprobs") else None,
            context_length=self.context_length,
        )
        if p.HasField("output"):
            params = replace(params, constraint=constraint_of(p.output, "params.output"))
        adapter, prompt, inputs = self._input(request)
        return GenerationRequest(adapter=adapter, prompt=prompt, inputs=inputs, params=params,
                                 request_id=request_id(request.request_id), default_output=not p.no_default_output,
                                 mix=checked_mix([(e.name, e.weight) for e in request.mix], adapter))

    async def Generate(self, request, context):
        n = samples(request.n)
        generation = self._request(request)
        results = await fanout.generate_samples(self.ready(), generation, n)
        result = results[0]
        s, f = result.started, result.finished
        response = generation_pb2.GenerateResponse(
            text=result.text,
            token_ids=result.token_ids,
            finish_reason=FINISH_REASONS[f.reason],
            usage=generation_pb2.Usage(prompt_tokens=f.prompt_tokens,
                                       completion_tokens=sum(r.finished.completion_tokens for r in results)),
            adapter=s.adapter,
            adapter_version=s.adapter_version,
            timings=_timings(f),
            request_id=s.request_id,
            logprobs=logprob_messages(result.token_ids, result.logprobs),
        )
        if n > 1:
            response.samples.extend(_sample(i, r) for i, r in enumerate(results))
        return response

    async def GenerateStream(self, request, context):
        n = samples(request.n)
        async for index, event in fanout.samples(self.ready(), self._request(request), n):
            if isinstance(event, Started):
                if index == 0:
                    yield generation_pb2.GenerateChunk(
                        adapter=event.adapter, adapter_version=event.adapter_version, request_id=event.request_id
                    )
            elif isinstance(event, TextPiece):
                yield generation_pb2.GenerateChunk(text=event.text, token_ids=event.token_ids, index=index,
                                                   logprobs=logprob_messages(event.token_ids, event.logprobs))
            elif isinstance(event, Finished):
                yield generation_pb2.GenerateChunk(
                    finish_reason=FINISH_REASONS[event.reason], usage=_usage(event), timings=_timings(event),
                    index=index,
                )

    async def Classify(self, request, context):
        adapter, prompt, inputs = self._input(request)
        result = await fanout.classify(self.ready(), adapter, prompt, inputs, list(request.labels),
                                       request_id(request.request_id))
        s = result.started
        return generation_pb2.ClassifyResponse(
            labels=[generation_pb2.LabelProbability(label=x.label, probability=x.probability, logprob=x.logprob,
                                                    tokens=x.tokens) for x in result.labels],
            adapter=s.adapter,
            adapter_version=s.adapter_version,
            request_id=s.request_id,
            usage=generation_pb2.Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.scored_tokens),
            timings=generation_pb2.Timings(queue_ms=result.queue_ms, total_ms=result.total_ms),
        )

    async def Tokenize(self, request, context):
        rendered, ids = await self.ready().tokenize(*self._input(request))
        return generation_pb2.TokenizeResponse(token_ids=ids, text=rendered)

    async def ModelInfo(self, request, context):
        m = self.manifest
        return generation_pb2.ModelInfoResponse(
            architecture=m.base.architecture,
            model_type=m.base.model_type,
            precision=m.precision,
            device=self.info["device"],
            provider=self.info["provider"],
            engine=self.info["engine"],
            context_length=self.context_length,
            vocab_size=self.vocab_size,
            lora_rank=m.lora_rank,
            lora_modules=m.lora_modules,
            adapters=self.ready().registry.names(),
            max_batch=self.info["max_batch"],
            max_queue=self.info["max_queue"],
            version=_loraplex_version(),
            accuracy={v.name: _accuracy(v.accuracy, m.precision) for v in self.ready().registry.versions()
                      if v.accuracy is not None},
            outputs={v.name: output_message(v.output) for v in self.ready().registry.versions()
                     if v.output is not None},
        )


class AdaptersServicer(adapters_pb2_grpc.AdaptersServicer, _Ready):
    def __init__(self, metrics: ServerMetrics, precision: str):
        self.metrics = metrics
        self.precision = precision

    async def List(self, request, context):
        registry = self.ready().registry
        return adapters_pb2.ListAdaptersResponse(adapters=[adapter_info(v, self.precision,
                                                                        residency(registry.engine, v))
                                                           for v in registry.versions()])

    async def Load(self, request, context):
        with self._counted("load"):
            registry = self.ready().registry
            version = await registry.load(request.name, request.path, adapter_version(request.version) or None,
                                          pin=request.pin)
            self.metrics.loaded_adapters.set(len(registry.names()))
        return adapter_info(version, self.precision, residency(registry.engine, version))

    async def Unload(self, request, context):
        with self._counted("unload"):
            registry = self.ready().registry
            version = await registry.unload(request.name, wait=not request.no_wait)
            self.metrics.loaded_adapters.set(len(registry.names()))
        return adapters_pb2.UnloadAdapterResponse(name=version.name, version=version.version,
                                                  requests_served=version.served)

    @contextlib.contextmanager
    def _counted(self, action: str) -> Iterator[None]:
        """Counts an admin call by action and outcome (`loraplex_adapter_loads_total`)."""
        status = "OK"
        try:
            yield
        except Exception as exc:
            status = status_name(exc)
            raise
        finally:
            self.metrics.adapter_loads.labels(action, status).inc()


def _accuracy(a: Accuracy, precision: str) -> adapters_pb2.TaskAccuracy:
    return adapters_pb2.TaskAccuracy(metric=a.metric, package=a.package[a.metric], pytorch=a.pytorch[a.metric],
                                     base=a.base[a.metric], examples=a.examples, precision=precision)


def adapter_info(v: AdapterVersion, precision: str, where: Residency | None = None) -> adapters_pb2.AdapterInfo:
    """`where`: its tier and what it cost (unset fields: an engine without a host cache)."""
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
    if v.accuracy is not None:
        info.accuracy.CopyFrom(_accuracy(v.accuracy, precision))
    if v.output is not None:
        info.output.CopyFrom(output_message(v.output))
    if where is not None:
        info.tier, info.host_bytes, info.loads, info.evictions = where.tier, where.nbytes, where.loads, where.evictions
        info.pinned, info.slot_hits, info.host_hits, info.misses = where.pinned, where.slot_hits, where.host_hits, \
            where.misses
    return info


def constraint_of(message: adapters_pb2.OutputConstraint, field: str) -> OutputConstraint:
    """A request's `OutputConstraint` message, checked (InvalidRequest naming the field at fault)."""
    kind = message.WhichOneof("kind")
    if kind is None:
        raise InvalidRequest(f"{field} is set but empty: set one of regex, json_schema, grammar, choice", field=field)
    if kind == "choice":
        return output_constraint(kind, list(message.choice.choices), f"{field}.choice.choices")
    return output_constraint(kind, getattr(message, kind), f"{field}.{kind}")


def output_message(constraint: OutputConstraint) -> adapters_pb2.OutputConstraint:
    if constraint.kind == "choice":
        return adapters_pb2.OutputConstraint(choice=adapters_pb2.Choice(choices=list(constraint.spec)))
    return adapters_pb2.OutputConstraint(**{constraint.kind: str(constraint.spec)})


def logprob_messages(token_ids: list[int], logprobs: list[TokenLogprobs]) -> list[generation_pb2.TokenLogprob]:
    return [generation_pb2.TokenLogprob(token_id=t, logprob=lp.logprob,
                                        top=[generation_pb2.TopLogprob(token_id=i, logprob=v) for i, v in lp.top])
            for t, lp in zip(token_ids, logprobs, strict=False)]


def _sample(index: int, result: GenerationResult) -> generation_pb2.Sample:
    return generation_pb2.Sample(index=index, text=result.text, token_ids=result.token_ids,
                                 finish_reason=FINISH_REASONS[result.finished.reason],
                                 completion_tokens=result.finished.completion_tokens,
                                 logprobs=logprob_messages(result.token_ids, result.logprobs))


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
