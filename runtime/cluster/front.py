"""ClusterFront: the gRPC contract behind Ray Serve's proxy, answered as the single server answers it.

Serve's gRPC proxy hands every call of the application to its ingress deployment, by method name
(`Generate`, `List`, `Check`...). This front end:
- forwards Generation calls to the engine replicas, routed by adapter: the adapter comes from
  the request itself, so no client needs to send Serve's `multiplexed_model_id` metadata;
- answers Adapters calls through the catalog (`Load`/`Unload` reach every replica, see
  `catalog`), and `grpc.health.v1.Health` from the replicas' reports;
- checks bearer tokens (`--auth-token-file`) as the single server's interceptor does;
- maps every error to the single server's status and message (`status.status_of`): errors raised
  on a replica cross Ray as exceptions; a replica that dies mid-request becomes UNAVAILABLE, and
  a unary call (or a stream that has sent nothing yet) is first retried on another replica;
- serves every replica's Prometheus metrics on Serve's HTTP proxy (`GET /<app>/metrics`).

Statuses cross Serve's proxy this way: a unary call sets the code and details on Serve's gRPC
context and returns an empty message; a stream sets them and raises (the proxy applies a code
set before an exception). Serve routes by method name alone, so `List` serves both
`loraplex.v1.Adapters/List` and `grpc.health.v1.Health/List`, told apart by the request type.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from loraplex.adapters.package.manifest import Manifest
from loraplex.runtime.cluster.catalog import AdapterStatus
from loraplex.runtime.cluster.config import ClusterConfig
from loraplex.runtime.cluster.federation import federate
from loraplex.runtime.errors import LoraplexError, Overloaded, ReplicaLost, ShuttingDown
from loraplex.runtime.server.adapter_files import CheckedAdapter
from loraplex.runtime.server.app import SERVICE_NAMES, read_token
from loraplex.runtime.server.auth import BearerAuth
from loraplex.runtime.server.registry import AdapterVersion
from loraplex.runtime.server.servicers import adapter_info
from loraplex.runtime.server.status import status_of
from loraplex.v1 import adapters_pb2, generation_pb2
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import PlainTextResponse

log = logging.getLogger(__name__)

ATTEMPTS = 3  # a call whose replica died is sent again, to another replica, up to this many times in all
HEALTH = health_pb2.HealthCheckResponse
GENERATION = "/loraplex.v1.Generation/"
ADAPTERS = "/loraplex.v1.Adapters/"


class ClusterFront:
    def __init__(self, config: ClusterConfig, engine: DeploymentHandle, catalog: DeploymentHandle):
        server = config.server
        token = read_token(server.auth_token_file) if server.auth_token_file else None
        self.auth = BearerAuth(token, server.auth_scope) if token else None
        self.engine = engine
        self.catalog = catalog
        self.precision = Manifest.load(server.package).precision  # shown with each adapter's accuracy

    # -- loraplex.v1.Generation ---------------------------------------------------------------
    async def Generate(self, request, grpc_context: RayServegRPCContext):
        return await self._unary(GENERATION + "Generate", grpc_context, generation_pb2.GenerateResponse,
                                 lambda: self._forward("Generate", request.adapter, request))

    async def GenerateStream(self, request, grpc_context: RayServegRPCContext) -> AsyncIterator[Any]:
        method = GENERATION + "GenerateStream"
        try:
            self._check(method, grpc_context)
            async for chunk in self._forward_stream(request):
                yield chunk
        except Exception as exc:
            self._set_status(grpc_context, exc, method)
            raise

    async def Tokenize(self, request, grpc_context: RayServegRPCContext):
        return await self._unary(GENERATION + "Tokenize", grpc_context, generation_pb2.TokenizeResponse,
                                 lambda: self._forward("Tokenize", request.adapter, request))

    async def ModelInfo(self, request, grpc_context: RayServegRPCContext):
        return await self._unary(GENERATION + "ModelInfo", grpc_context, generation_pb2.ModelInfoResponse,
                                 lambda: self._forward("ModelInfo", "", request))

    async def Classify(self, request, grpc_context: RayServegRPCContext):
        return await self._unary(GENERATION + "Classify", grpc_context, generation_pb2.ClassifyResponse,
                                 lambda: self._forward("Classify", request.adapter, request))

    # -- loraplex.v1.Adapters (and grpc.health.v1.Health/List) -------------------------------
    async def List(self, request, grpc_context: RayServegRPCContext):
        if isinstance(request, health_pb2.HealthListRequest):
            status = HEALTH(status=await self._health())
            return health_pb2.HealthListResponse(statuses={name: status for name in ("", *SERVICE_NAMES)})

        async def listing():
            listed: list[AdapterStatus] = await self.catalog.status.remote()
            return adapters_pb2.ListAdaptersResponse(adapters=[_info(s.adapter, s.in_flight, s.served, self.precision)
                                                                 for s in listed])

        return await self._unary(ADAPTERS + "List", grpc_context, adapters_pb2.ListAdaptersResponse, listing)

    async def Load(self, request, grpc_context: RayServegRPCContext):
        async def load():
            checked: CheckedAdapter = _answer(await self.catalog.load.remote(request.name, request.path,
                                                                             request.version))
            return _info(checked, 0, 0, self.precision)

        return await self._unary(ADAPTERS + "Load", grpc_context, adapters_pb2.AdapterInfo, load)

    async def Unload(self, request, grpc_context: RayServegRPCContext):
        async def unload():
            adapter, served = _answer(await self.catalog.unload.remote(request.name, not request.no_wait))
            return adapters_pb2.UnloadAdapterResponse(name=adapter.name, version=adapter.version,
                                                      requests_served=served)

        return await self._unary(ADAPTERS + "Unload", grpc_context, adapters_pb2.UnloadAdapterResponse, unload)

    # -- grpc.health.v1.Health ----------------------------------------------------------------
    async def Check(self, request, grpc_context: RayServegRPCContext):
        if request.service not in ("", *SERVICE_NAMES):
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"unknown service {request.service!r}")
            return HEALTH()
        return HEALTH(status=await self._health())

    async def Watch(self, request, grpc_context: RayServegRPCContext) -> AsyncIterator[Any]:
        last = None
        while True:
            status = await self._health()
            if status != last:
                last = status
                yield HEALTH(status=status)
            await asyncio.sleep(1.0)

    async def _health(self) -> int:
        try:
            serving = await asyncio.wait_for(self.catalog.healthy.remote(), 5.0)
        except Exception:
            log.warning("health: the adapter catalog did not answer", exc_info=True)
            serving = False
        return HEALTH.SERVING if serving else HEALTH.NOT_SERVING

    # -- Prometheus, on Serve's HTTP proxy ----------------------------------------------------
    async def __call__(self, request: Request) -> PlainTextResponse:
        if not request.url.path.rstrip("/").endswith("/metrics"):
            return PlainTextResponse("loraplex cluster: GET <route>/metrics for Prometheus\n", status_code=404)
        texts: dict[str, str] = await self.catalog.metrics.remote()
        return PlainTextResponse(federate(texts), media_type="text/plain; version=0.0.4")

    # -- forwarding to the engine replicas ----------------------------------------------------
    def _engine(self, method: str, adapter: str, stream: bool = False) -> DeploymentHandle:
        options: dict[str, Any] = {"method_name": method, "stream": stream}
        if adapter:
            options["multiplexed_model_id"] = adapter  # Serve routes by it (see `routing`)
        return self.engine.options(**options)

    async def _forward(self, method: str, adapter: str, request) -> Any:
        attempt = 1
        while True:
            response = self._engine(method, adapter).remote(request)
            try:
                return _answer(await response)
            except asyncio.CancelledError:
                response.cancel()  # the client went away: stop the replica's work too
                raise
            except (RayActorError, ReplicaUnavailableError) as exc:
                if attempt == ATTEMPTS:
                    raise _lost(exc) from exc
                log.warning("%s: its replica stopped (%s); retrying on another replica", method, type(exc).__name__)
            attempt += 1

    async def _forward_stream(self, request) -> AsyncIterator[Any]:
        sent = False
        for attempt in range(1, ATTEMPTS + 1):
            response = self._engine("GenerateStream", request.adapter, stream=True).remote(request)
            try:
                async for chunk in response:
                    if isinstance(chunk, LoraplexError):  # the replica's answer to a client's error
                        raise chunk
                    sent = True
                    yield chunk
                return
            except (RayActorError, ReplicaUnavailableError) as exc:
                if sent or attempt == ATTEMPTS:  # part of the answer is out: the client must retry
                    raise _lost(exc) from exc
                log.warning("GenerateStream: its replica stopped before answering; retrying on another replica")
            finally:
                response.cancel()  # no-op once finished; stops the replica's work if the client went away

    # -- statuses ---------------------------------------------------------------------------
    def _check(self, method: str, grpc_context: RayServegRPCContext) -> None:
        if self.auth is not None and self.auth.guards(method):
            self.auth.check(grpc_context.invocation_metadata())

    async def _unary(self, method: str, grpc_context: RayServegRPCContext, empty: Callable[[], Any],
                     call: Callable[[], Awaitable[Any]]) -> Any:
        try:
            self._check(method, grpc_context)
            return await call()
        except Exception as exc:
            self._set_status(grpc_context, exc, method)
            return empty()

    @staticmethod
    def _set_status(grpc_context: RayServegRPCContext, error: BaseException, method: str) -> None:
        code, details = status_of(_cause(error), method)
        grpc_context.set_code(code)
        grpc_context.set_details(details)


def _answer(result: Any) -> Any:
    """A replica's or the catalog's answer; a client's error comes back as a value: raise it here."""
    if isinstance(result, LoraplexError):
        raise result
    return result


def _cause(error: BaseException) -> BaseException:
    """The error as the single server would have raised it."""
    if isinstance(error, RayTaskError):  # raised on a replica or in the catalog: the original exception
        error = error.cause if error.cause is not None else error
    if isinstance(error, BackPressureError):
        return Overloaded(f"the cluster's request queue is full ({error.message}); retry later or add replicas")
    if isinstance(error, DeploymentUnavailableError):
        return ShuttingDown(f"no engine replica is available ({error.message}); retry when health says SERVING")
    if isinstance(error, (RayActorError, ReplicaUnavailableError)):
        return _lost(error)
    return error


def _lost(error: BaseException) -> ReplicaLost:
    return ReplicaLost(f"the replica serving this request stopped before answering ({type(error).__name__}); "
                       "retry: the cluster routes it to another replica")


def _info(adapter: CheckedAdapter, in_flight: int, served: int, precision: str) -> adapters_pb2.AdapterInfo:
    version = AdapterVersion.of(adapter, None)
    version.leases, version.served = in_flight, served
    return adapter_info(version, precision)

