"""Thin typed clients for a loraplex server: `Client` (blocking) and `AsyncClient` (asyncio).

They build the proto messages from plain arguments and return the proto responses unchanged;
errors arrive as `grpc.RpcError` (`AioRpcError` for AsyncClient) with the server's status code.
`tls=ClientTLS(...)` connects over TLS (and presents a client certificate for mutual TLS).

The same client talks to `loraplex serve` and to a Ray Serve cluster (`loraplex serve-ray`): the
cluster routes by the adapter named in the request, so no routing metadata is needed. Only when
the cluster runs several Serve applications does a call need to name one: `application=`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from loraplex.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc


def generate_request(
    adapter: str = "",
    prompt: str | None = None,
    inputs: Mapping[str, str] | None = None,
    *,
    max_new_tokens: int = 0,
    temperature: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    seed: int | None = None,
    repetition_penalty: float = 0.0,
    stop: Sequence[str] = (),
    ignore_eos: bool = False,
    request_id: str = "",
    regex: str | None = None,
    json_schema: str | None = None,
    grammar: str | None = None,
    choice: Sequence[str] | None = None,
    no_default_output: bool = False,
    logprobs: int | None = None,
    n: int = 0,
    mix: Sequence[tuple[str, float]] = (),
) -> generation_pb2.GenerateRequest:
    """A GenerateRequest from plain values (0 = the server's default, see generation.proto).

    At most one of `regex`, `json_schema` (JSON text), `grammar` (Lark) and `choice` sets the
    output constraint; `no_default_output` opts out of the adapter's default one. `logprobs`: each
    token's log-probability and this many alternatives; `n`: samples of the prompt; `mix`: (adapter,
    weight) pairs served as one weighted mix instead of `adapter`.
    """
    if (prompt is None) == (inputs is None):
        raise ValueError("pass exactly one of prompt= or inputs=")
    params = generation_pb2.SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        stop=list(stop),
        ignore_eos=ignore_eos,
        no_default_output=no_default_output,
    )
    if seed is not None:
        params.seed = seed
    if logprobs is not None:
        params.logprobs = logprobs
    kinds = {"regex": regex, "json_schema": json_schema, "grammar": grammar}
    given = [k for k, v in kinds.items() if v is not None] + (["choice"] if choice is not None else [])
    if len(given) > 1:
        raise ValueError(f"pass at most one output constraint, got {', '.join(given)}")
    if choice is not None:
        params.output.choice.choices.extend(choice)
    elif given:
        setattr(params.output, given[0], kinds[given[0]])
    request = generation_pb2.GenerateRequest(adapter=adapter, params=params, request_id=request_id, n=n)
    request.mix.extend(generation_pb2.AdapterWeight(name=name, weight=weight) for name, weight in mix)
    if prompt is not None:
        request.prompt = prompt
    else:
        request.inputs.fields.update(dict(inputs or {}))
    return request


@dataclass(frozen=True)
class ClientTLS:
    """TLS for a client's channel.

    ca: PEM roots to trust (None: the system's roots); a server with a private CA needs it.
    cert, key: PEM client certificate and key, for a server that requires mutual TLS.
    server_name: the name to check the server's certificate against, when the target address is
        not a name the certificate holds (e.g. an IP address).
    """

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs both cert and key (PEM files)")

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: Path | None) -> bytes | None:
            return Path(path).read_bytes() if path is not None else None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca), private_key=read(self.key), certificate_chain=read(self.cert)
        )

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


class _CallOptions:
    """Per-call deadline and metadata: the Serve application (if any) and the bearer token (if any)
    on every call, so one client serves a server whose token guards admin calls or all of them."""

    def __init__(self, token: str | None, timeout: float | None, application: str | None):
        self.timeout = timeout
        self.metadata = ([("application", application)] if application else []) + (
            [("authorization", f"Bearer {token}")] if token else [])

    def __call__(self, *, admin: bool = False, timeout: float | None | object = ...) -> dict:
        return {"timeout": self.timeout if timeout is ... else timeout, "metadata": self.metadata or None}


def classify_request(adapter: str = "", prompt: str | None = None, inputs: Mapping[str, str] | None = None,
                     labels: Sequence[str] = (), request_id: str = "") -> generation_pb2.ClassifyRequest:
    """A ClassifyRequest (no `labels`: the adapter's choice contract)."""
    if (prompt is None) == (inputs is None):
        raise ValueError("pass exactly one of prompt= or inputs=")
    request = generation_pb2.ClassifyRequest(adapter=adapter, labels=list(labels), request_id=request_id)
    if prompt is not None:
        request.prompt = prompt
    else:
        request.inputs.fields.update(dict(inputs or {}))
    return request


def _tokenize_request(adapter: str, prompt: str | None, inputs: Mapping[str, str] | None):
    request = generation_pb2.TokenizeRequest(adapter=adapter)
    if inputs is not None:
        request.inputs.fields.update(dict(inputs))
    else:
        request.prompt = prompt or ""
    return request


class Client:
    """Blocking client. `timeout` (seconds) is the default deadline of every call; `application` names
    the Serve application on a Ray cluster that runs several."""

    def __init__(self, target: str, *, token: str | None = None, timeout: float | None = 60.0,
                 tls: ClientTLS | None = None, application: str | None = None):
        if tls is None:
            self.channel = grpc.insecure_channel(target)
        else:
            self.channel = grpc.secure_channel(target, tls.credentials(), options=tls.options())
        self.generation = generation_pb2_grpc.GenerationStub(self.channel)
        self.adapters = adapters_pb2_grpc.AdaptersStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.token = token
        self.timeout = timeout
        self.options = _CallOptions(token, timeout, application)

    def generate(self, adapter: str = "", prompt: str | None = None, inputs=None, **params):
        options = self.options(timeout=params.pop("timeout", self.timeout))
        return self.generation.Generate(generate_request(adapter, prompt, inputs, **params), **options)

    def stream(self, adapter: str = "", prompt: str | None = None, inputs=None, **params) -> Iterator:
        options = self.options(timeout=params.pop("timeout", self.timeout))
        return self.generation.GenerateStream(generate_request(adapter, prompt, inputs, **params), **options)

    def classify(self, adapter: str = "", prompt: str | None = None, inputs=None, labels: Sequence[str] = (),
                 **options) -> generation_pb2.ClassifyResponse:
        call = self.options(timeout=options.pop("timeout", self.timeout))
        return self.generation.Classify(classify_request(adapter, prompt, inputs, labels, **options), **call)

    def tokenize(self, adapter: str = "", prompt: str | None = None, inputs=None) -> list[int]:
        response = self.generation.Tokenize(_tokenize_request(adapter, prompt, inputs), **self.options())
        return list(response.token_ids)

    def model_info(self) -> generation_pb2.ModelInfoResponse:
        return self.generation.ModelInfo(generation_pb2.ModelInfoRequest(), **self.options())

    def list_adapters(self) -> list[adapters_pb2.AdapterInfo]:
        return list(self.adapters.List(adapters_pb2.ListAdaptersRequest(), **self.options()).adapters)

    def load_adapter(self, name: str, path: str, version: str = "", pin: bool = False
                     ) -> adapters_pb2.AdapterInfo:
        request = adapters_pb2.LoadAdapterRequest(name=name, path=str(path), version=version, pin=pin)
        return self.adapters.Load(request, **self.options(admin=True))

    def unload_adapter(self, name: str, no_wait: bool = False) -> adapters_pb2.UnloadAdapterResponse:
        request = adapters_pb2.UnloadAdapterRequest(name=name, no_wait=no_wait)
        return self.adapters.Unload(request, **self.options(admin=True))

    def health(self, service: str = "") -> str:
        """"SERVING", "NOT_SERVING", ... for the whole server ("") or one service."""
        response = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), **self.options())
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client with the same methods as `Client` (awaitable; `stream` is an async iterator)."""

    def __init__(self, target: str, *, token: str | None = None, timeout: float | None = 60.0,
                 tls: ClientTLS | None = None, application: str | None = None):
        if tls is None:
            self.channel = grpc.aio.insecure_channel(target)
        else:
            self.channel = grpc.aio.secure_channel(target, tls.credentials(), options=tls.options())
        self.generation = generation_pb2_grpc.GenerationStub(self.channel)
        self.adapters = adapters_pb2_grpc.AdaptersStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.token = token
        self.timeout = timeout
        self.options = _CallOptions(token, timeout, application)

    async def generate(self, adapter: str = "", prompt: str | None = None, inputs=None, **params):
        options = self.options(timeout=params.pop("timeout", self.timeout))
        return await self.generation.Generate(generate_request(adapter, prompt, inputs, **params), **options)

    def stream(self, adapter: str = "", prompt: str | None = None, inputs=None, **params) -> AsyncIterator:
        options = self.options(timeout=params.pop("timeout", self.timeout))
        return self.generation.GenerateStream(generate_request(adapter, prompt, inputs, **params), **options)

    async def classify(self, adapter: str = "", prompt: str | None = None, inputs=None, labels: Sequence[str] = (),
                       **options) -> generation_pb2.ClassifyResponse:
        call = self.options(timeout=options.pop("timeout", self.timeout))
        return await self.generation.Classify(classify_request(adapter, prompt, inputs, labels, **options), **call)

    async def tokenize(self, adapter: str = "", prompt: str | None = None, inputs=None) -> list[int]:
        response = await self.generation.Tokenize(_tokenize_request(adapter, prompt, inputs), **self.options())
        return list(response.token_ids)

    async def model_info(self) -> generation_pb2.ModelInfoResponse:
        return await self.generation.ModelInfo(generation_pb2.ModelInfoRequest(), **self.options())

    async def list_adapters(self) -> list[adapters_pb2.AdapterInfo]:
        return list((await self.adapters.List(adapters_pb2.ListAdaptersRequest(), **self.options())).adapters)

    async def load_adapter(self, name: str, path: str, version: str = "", pin: bool = False
                     ) -> adapters_pb2.AdapterInfo:
        request = adapters_pb2.LoadAdapterRequest(name=name, path=str(path), version=version, pin=pin)
        return await self.adapters.Load(request, **self.options(admin=True))

    async def unload_adapter(self, name: str, no_wait: bool = False) -> adapters_pb2.UnloadAdapterResponse:
        request = adapters_pb2.UnloadAdapterRequest(name=name, no_wait=no_wait)
        return await self.adapters.Unload(request, **self.options(admin=True))

    async def health(self, service: str = "") -> str:
        request = health_pb2.HealthCheckRequest(service=service)
        response = await self.health_stub.Check(request, **self.options())
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
