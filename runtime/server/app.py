"""Build and run a loraplex gRPC server in-process: `start_server(ServerConfig) -> RunningServer`.

The CLI (`loraplex serve`), the tests, the demo and the benchmarks all start servers through this.
Order at start: the package is read and the model starts loading in threads (`loading`; `loraplex
serve` starts it before it imports this module, so the session is made while grpc, the servicers
and Prometheus import); the gRPC port opens with health NOT_SERVING (load balancers see the
replica) while it loads; then the package's adapters are loaded, every adapter (the edge profile:
the base) is warmed up with one token, and only then health says SERVING. `drain` is the
SIGTERM path: NOT_SERVING, no new requests, in-flight requests finish, then the port closes.

With `http_port`, the OpenAI-compatible HTTP front end (`loraplex.runtime.http`, the `http` extra)
opens right after the gRPC port, on the same loop, over the same request path; it is imported only
then, so a gRPC-only server never loads Starlette or uvicorn. Health, draining and stopping cover
both ports.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from loraplex.adapters.package.reader import Package
from loraplex.runtime.engines.base import Engine, SamplingParams
from loraplex.runtime.server.adapter_metrics import watch_adapter_cache
from loraplex.runtime.server.adapter_store import AdapterSource, AdapterStores, DirectoryStore
from loraplex.runtime.server.auth import BearerAuth
from loraplex.runtime.server.config import BYTES_PER_CONTEXT_TOKEN, ServerConfig, ServerTLS  # noqa: F401 (re-exported)
from loraplex.runtime.server.generation import GenerationRequest, GenerationService
from loraplex.runtime.server.loading import ModelLoad, start_loading
from loraplex.runtime.server.metrics import ServerMetrics
from loraplex.runtime.server.registry import AdapterRegistry, adapter_cache
from loraplex.runtime.server.servicers import AdaptersServicer, GenerationServicer
from loraplex.runtime.server.status import ServingInterceptor
from loraplex.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc

if TYPE_CHECKING:
    from loraplex.adapters.package.manifest import Manifest
    from loraplex.runtime.http.server import HttpFrontend

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name,
    adapters_pb2.DESCRIPTOR.services_by_name["Adapters"].full_name,
)


@dataclass
class RunningServer:
    config: ServerConfig
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    metrics: ServerMetrics
    service: GenerationService
    registry: AdapterRegistry
    engine: Engine
    metrics_port: int | None = None
    http: HttpFrontend | None = None  # the OpenAI-compatible HTTP port, with `http_port`
    _metrics_http: object | None = None
    _stopped: bool = False

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http is not None else None

    @property
    def target(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def set_serving(self, serving: bool) -> None:
        await _set_health(self.health, serving)
        if self.http is not None:
            self.http.state.serving = serving

    async def drain(self, grace: float | None = 30.0) -> bool:
        """Health NOT_SERVING, refuse new requests, wait for in-flight ones; True if all finished."""
        await self.set_serving(False)
        self.service.draining = True
        finished = await self.service.wait_idle(grace)
        if not finished:
            log.warning("drain: %d request(s) still in flight after %ss; cancelling", self.service.in_flight, grace)
        return finished

    async def stop(self, grace: float | None = 5.0) -> None:
        """Drain for up to `grace` seconds, then close the port, the engine and the metrics endpoint."""
        if self._stopped:
            return
        self._stopped = True
        await self.drain(grace)
        await self.server.stop(1.0)
        if self.http is not None:
            await self.http.close()
        await self.registry.close()
        await asyncio.to_thread(self.engine.close)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()


async def start_server(config: ServerConfig, load: ModelLoad | None = None) -> RunningServer:
    """Start serving `config.package`; returns once health says SERVING. `load`: the model's load,
    started by the caller from `config` (`loraplex serve` starts it before importing this module);
    the server owns it from here, and closes its engine if the start fails."""
    try:
        auth = BearerAuth(read_token(config.auth_token_file), config.auth_scope) if config.auth_token_file else None
        load = load or start_loading(config)
    except BaseException:
        if load is not None:
            await load.aclose()
        raise
    package = load.package
    metrics = ServerMetrics()
    # The model loads (the session is made without the GIL) while the port opens.
    core_task = asyncio.ensure_future(build_core(config, package, metrics, load))
    try:
        generation = generation_servicer(config, package)
        adapters = AdaptersServicer(metrics, package.manifest.precision)
        health_servicer = health.aio.HealthServicer()

        server = grpc.aio.server(interceptors=[ServingInterceptor(auth)])
        generation_pb2_grpc.add_GenerationServicer_to_server(generation, server)
        adapters_pb2_grpc.add_AdaptersServicer_to_server(adapters, server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{config.host}:{config.port}"
        try:  # grpcio returns 0 on some failures and raises RuntimeError ("Failed to bind") on others
            port = server.add_insecure_port(address) if config.tls is None else \
                server.add_secure_port(address, config.tls.credentials())
        except RuntimeError:
            port = 0
        if port == 0:
            raise OSError(f"cannot listen on {config.host}:{config.port} (port in use?)")
        await _set_health(health_servicer, False)
        await server.start()
        log.info("listening on %s:%d%s (NOT_SERVING until the model is warm)", config.host, port,
                 "" if config.tls is None else " with mutual TLS" if config.tls.client_ca else " with TLS")
    except BaseException:
        await _discard(core_task)
        raise

    http = None
    try:
        if config.http_port is not None:
            http = await _open_http(config, package.manifest, package.config.context_length,
                                    max_prompt_bytes(config, package), metrics, auth)
        core = await core_task
    except BaseException:
        await server.stop(None)
        if http is not None:
            await http.close()
        await _discard(core_task)
        raise
    service, registry, engine = core.service, core.registry, core.engine
    generation.service = adapters.service = service
    running = RunningServer(config, server, port, health_servicer, metrics, service, registry, engine, http=http)
    if http is not None:
        tokenizer = service.tokenizer
        http.state.chat_prompt = tokenizer.chat_prompt if tokenizer.chat_template is not None else None
        http.state.service = service
    if config.metrics_port is not None:
        running._metrics_http, running.metrics_port = metrics.serve(config.metrics_port, config.host, config.tls)
    await running.set_serving(True)
    log.info("serving %s on %s (engine %s, adapters: %s)", package.root, running.target, config.engine,
             ", ".join(registry.names()) or "none")
    return running


async def _discard(core_task: asyncio.Future) -> None:
    """Wait for a core that will not be served (the start failed elsewhere) and close its engine."""
    try:
        core = await core_task
    except BaseException:
        return  # build_core closed what it had built
    await asyncio.to_thread(core.engine.close)


def generation_servicer(config: ServerConfig, package: Package) -> GenerationServicer:
    """The Generation servicer for `config` (its service is set once the model is warm)."""
    info = dict(engine=config.engine, device=config.device, provider=config.provider or "",
                max_batch=config.max_batch, max_queue=config.max_queue)
    return GenerationServicer(package.manifest, package.config.context_length, package.config.vocab_size, info)


def adapter_stores(config: ServerConfig, package: Package) -> AdapterStores:
    """The configured stores, the package's own adapters directory first (none when none are configured)."""
    if not config.adapter_stores:
        return AdapterStores([])
    sources: list[AdapterSource] = []
    seen: set[Path] = set()
    for store in [package.adapter_dir, *config.adapter_stores]:
        if isinstance(store, (str, Path)):
            root = Path(store).resolve()
            if root in seen:
                continue
            seen.add(root)
            store = DirectoryStore(root)
        sources.append(store)
    return AdapterStores(sources)


def max_prompt_bytes(config: ServerConfig, package: Package) -> int:
    return config.max_prompt_bytes or BYTES_PER_CONTEXT_TOKEN * package.config.context_length


@dataclass
class ServingCore:
    """What serves requests, without a port: engine, adapter registry and the request path."""

    package: Package
    engine: Engine
    registry: AdapterRegistry
    service: GenerationService


async def build_core(config: ServerConfig, package: Package, metrics: ServerMetrics,
                     load: ModelLoad | None = None) -> ServingCore:
    """Load the model (or take `load`'s), the package's adapters (if configured) and warm up; the engine
    is closed on failure.

    `start_server` serves the result on its own port; a cluster replica (`loraplex.runtime.cluster`)
    serves it behind Ray Serve's proxy.
    """
    # Engine and tokenizer side by side (both load native libraries and release the GIL): start-up is
    # the longer of the two.
    engine, tokenizer = await (load or ModelLoad(config, package)).result()
    try:
        registry = AdapterRegistry(engine, package, Path(config.adapter_root or package.adapter_dir),
                                   adapter_stores(config, package), set(config.pin))
        watch_adapter_cache(metrics, adapter_cache(engine))
        service = GenerationService(engine, registry, tokenizer, package.config.context_length, metrics,
                                    max_batch=config.max_batch, max_queue=config.max_queue, max_mixes=config.max_mixes,
                                    max_prompt_bytes=max_prompt_bytes(config, package))
        if config.load_package_adapters:
            for name, entry in sorted(package.manifest.adapters.items()):
                await registry.load_file(name, package.adapter_path(name), entry.version)
        for name in config.pin:  # a pinned adapter is loaded at start, from the stores if not from the package
            await registry.ensure(name)
        metrics.loaded_adapters.set(len(registry.names()))
        metrics.watch_prefix_cache(getattr(engine, "prefix_cache", None))
        metrics.watch_speculation(getattr(getattr(engine, "runner", None), "speculator", None))
        if config.warmup:
            await _warm_up(service, registry.names() if config.warm_adapters else [])
    except BaseException:
        await asyncio.to_thread(engine.close)
        raise
    return ServingCore(package, engine, registry, service)


async def _open_http(config: ServerConfig, manifest: Manifest, context_length: int, max_prompt_bytes: int,
                     metrics: ServerMetrics, auth: BearerAuth | None) -> HttpFrontend:
    """The HTTP front end on `config.http_port`, answering 503 until the server is warm."""
    try:  # the `http` extra: imported only when an HTTP port is asked for
        from loraplex.runtime.http.routes import HttpState
        from loraplex.runtime.http.server import HttpFrontend
    except ImportError as exc:
        raise ModuleNotFoundError(
            f"--http-port needs the HTTP extra ({exc}): pip install 'loraplex[http]'", name=exc.name
        ) from exc
    state = HttpState(base_id=base_model_id(manifest), context_length=context_length,
                      max_prompt_bytes=max_prompt_bytes, metrics=metrics, chat_prompt=None, auth=auth,
                      created=int(time.time()))
    http = HttpFrontend(state, config.host, config.http_port, config.tls)
    await http.open()
    return http


def base_model_id(manifest: Manifest) -> str:
    """The HTTP `model` id of the base model: `base:<model_type>` (e.g. `base:llama`). Stable for a
    package, and never an adapter's name (adapter names have no colon)."""
    return f"base:{manifest.base.model_type}"


async def _set_health(servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", *SERVICE_NAMES):
        await servicer.set(name, status)


async def _warm_up(service: GenerationService, adapters: list[str]) -> None:
    """One token on the base model and on `adapters`: sessions built, adapter files proven to run."""
    params = SamplingParams(max_new_tokens=1)
    for name in ["", *adapters]:
        await service.generate(GenerationRequest(adapter=name, prompt="warm up", params=params, request_id="warmup"))


def read_token(path: Path) -> str:
    token = Path(path).read_text().strip()
    if not token:
        raise ValueError(f"--auth-token-file {path} is empty: write the bearer token into it")
    return token


async def serve(config: ServerConfig, drain_grace: float = 30.0, load: ModelLoad | None = None) -> int:
    """Run until SIGTERM/SIGINT, then drain and exit (what `loraplex serve` runs); `load` as `start_server`'s."""
    running = await start_server(config, load)
    print(f"loraplex serving on {running.target}", flush=True)
    if running.metrics_port is not None:
        scheme = "https" if config.tls else "http"
        print(f"metrics on {scheme}://{config.host}:{running.metrics_port}/metrics", flush=True)
    if running.http is not None:
        print(f"OpenAI-compatible HTTP on {running.http.url}/v1", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received: draining (%d request(s) in flight)", running.service.in_flight)
    await running.stop(drain_grace)
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Drained: a signal repeated while the process exits (a supervisor sending SIGTERM again) is
        # ignored; without this, once asyncio closes its loop the default action would kill the
        # process and the exit status would no longer say the drain completed.
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)
    log.info("stopped")
    return 0
