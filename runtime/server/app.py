"""Build and run a loraplex gRPC server in-process: `start_server(ServerConfig) -> RunningServer`.

The CLI (`loraplex serve`), the tests, the demo and the benchmarks all start servers through this.
Order at start: the gRPC port opens first with health NOT_SERVING (load balancers see the
replica), then the package is read, the engine loads the model, the package's adapters are loaded,
every adapter is warmed up with one token, and only then health says SERVING. `drain` is the
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from loraplex.adapters.package.reader import Package
from loraplex.runtime.engines import build_engine, resolve_engine
from loraplex.runtime.engines.base import SPECULATION_MODES, Engine, SamplingParams
from loraplex.runtime.engines.heap import limit_heap_arenas
from loraplex.runtime.server.adapter_metrics import watch_adapter_cache
from loraplex.runtime.server.adapter_store import AdapterSource, AdapterStores, DirectoryStore
from loraplex.runtime.server.auth import AuthScope, BearerAuth
from loraplex.runtime.server.generation import GenerationRequest, GenerationService
from loraplex.runtime.server.metrics import ServerMetrics
from loraplex.runtime.server.profiles import get_profile
from loraplex.runtime.server.registry import AdapterRegistry, adapter_cache
from loraplex.runtime.server.servicers import AdaptersServicer, GenerationServicer
from loraplex.runtime.server.status import ServingInterceptor
from loraplex.runtime.server.tokenizer import open_tokenizer
from loraplex.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc

if TYPE_CHECKING:
    from loraplex.adapters.package.manifest import Manifest
    from loraplex.runtime.http.server import HttpFrontend

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name,
    adapters_pb2.DESCRIPTOR.services_by_name["Adapters"].full_name,
)


MIB = 1 << 20
BYTES_PER_CONTEXT_TOKEN = 16  # a prompt longer than this per context token cannot fit the context anyway


@dataclass(frozen=True)
class ServerTLS:
    """TLS on the gRPC port and the metrics endpoint; with `client_ca`, mutual TLS: every client
    must present a certificate signed by that CA (a client without one is refused at the handshake)."""

    cert: Path  # PEM certificate chain of the server
    key: Path  # PEM private key of the server
    client_ca: Path | None = None  # PEM CA bundle client certificates must chain to (mutual TLS)

    def __post_init__(self) -> None:
        for what, path in (("--tls-cert", self.cert), ("--tls-key", self.key), ("--tls-client-ca", self.client_ca)):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{what} {path} is not a file: give a PEM file")
        self._check_pem()

    def _check_pem(self) -> None:
        """Each file holds what it should, and the key is the certificate's: gRPC's own failure says only
        'Failed to bind to address'."""
        import ssl

        for what, path, marker in (("--tls-cert", self.cert, "CERTIFICATE-----"),
                                   ("--tls-key", self.key, "PRIVATE KEY-----"),
                                   ("--tls-client-ca", self.client_ca, "CERTIFICATE-----")):
            if path is not None and marker not in Path(path).read_text(errors="replace"):
                raise ValueError(f"{what} {path} holds no PEM {marker.rstrip('-').lower()}: give a PEM file")
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(self.cert, self.key)
        except ssl.SSLError as exc:
            raise ValueError(f"--tls-key {self.key} is not the private key of --tls-cert {self.cert} (or one of "
                             f"them cannot be read: {exc.reason or exc})") from None

    def credentials(self) -> grpc.ServerCredentials:
        client_ca = Path(self.client_ca).read_bytes() if self.client_ca else None
        return grpc.ssl_server_credentials(
            [(Path(self.key).read_bytes(), Path(self.cert).read_bytes())],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )


@dataclass
class ServerConfig:
    package: Path
    host: str = "127.0.0.1"
    port: int = 50051  # 0 = any free port (RunningServer.port tells which)
    device: str = "cpu"  # cpu | gpu | npu
    provider: str | None = None  # cuda | dml | qnn | openvino | webgpu (default: per device)
    engine: str = "auto"  # auto | batched | genai; __post_init__ resolves auto (batched on cpu)
    # Presets for the options left None below (see `profiles`): "default" or "edge".
    profile: str = "default"
    max_batch: int | None = None  # requests decoding at once (default 8; edge 4)
    max_queue: int | None = None  # requests waiting beyond max_batch before RESOURCE_EXHAUSTED (64; edge 16)
    max_slots: int | None = None  # batched engine: adapters resident in the weight bank (None = max_batch)
    intra_op_threads: int | None = None  # batched engine: onnxruntime threads (0 = one per physical core)
    allow_spinning: bool | None = None  # batched engine: onnxruntime threads busy-wait (default yes; edge no)
    memory_arena: bool | None = None  # batched engine: onnxruntime's CPU arena (default on; edge off)
    warm_adapters: bool | None = None  # warm every adapter at start, else the base only (default yes; edge no)
    malloc_arenas: int | None = None  # glibc malloc arenas, set at start (0: glibc's default; edge 1)
    session_cache: bool = True  # batched engine: optimized session + prepacked weights cached per machine
    # Batched engine: MiB for the KV of prompt prefixes kept across requests (per adapter version's weights;
    # 0 = off, None = 64). The genai engine has no prefix cache: a value given there is ignored (logged).
    prefix_cache_mib: float | None = None
    # Batched engine: speculative decoding, drafts verified in the decode step (`on`: prompt lookup and
    # the output contract where they pay; `auto`: the same on fp32 packages, off on quantized ones, whose
    # multi-token steps round otherwise; `lookup`, `contract`: one source; `off`). The genai engine has none.
    speculation: str = "auto"
    adapter_root: Path | None = None  # Load paths resolve under it (default: the package's adapters/)
    # Where a request's adapter that is not loaded is found on first use (directories, or any
    # `AdapterSource`); with any, the package's own adapters/ is the first store. Empty: none.
    adapter_stores: Sequence[Path | str | AdapterSource] = ()
    pin: Sequence[str] = ()  # adapter names whose versions stay in host memory (never evicted)
    # Host memory for adapters no request uses (None: a tenth of the machine's memory, at most 2 GiB);
    # beyond it the least recently used are dropped and read again from their file on next use.
    adapter_cache_mib: float | None = None
    max_mixes: int = 16  # weighted adapter mixes kept loaded; beyond, the least recently used idle one is unloaded
    auth_token_file: Path | None = None  # bearer token for Adapters.Load/Unload (or every call: auth_scope)
    auth_scope: AuthScope = "admin"
    metrics_port: int | None = None  # Prometheus HTTP(S) port (0 = any free port, None = off)
    # A prompt (or the task inputs) over this many UTF-8 bytes is refused before tokenizing
    # (None = BYTES_PER_CONTEXT_TOKEN per token of the model's context length).
    max_prompt_bytes: int | None = None
    tls: ServerTLS | None = None  # None = plaintext (loopback, or behind a TLS-terminating proxy)
    # OpenAI-compatible HTTP port beside gRPC (0 = any free port, None = off); needs `loraplex[http]`.
    # Same auth (scope `all` guards its /v1 routes), TLS and metrics as the gRPC port.
    http_port: int | None = None
    load_package_adapters: bool = True
    warmup: bool = True

    def __post_init__(self) -> None:
        self.package = Path(self.package)
        self.engine = resolve_engine(self.engine, self.device)
        preset = get_profile(self.profile)
        for option in ("max_batch", "max_queue", "intra_op_threads", "allow_spinning", "memory_arena",
                       "warm_adapters", "malloc_arenas"):
            if getattr(self, option) is None:
                setattr(self, option, getattr(preset, option))
        if self.prefix_cache_mib is None and self.engine == "batched":  # genai has none
            self.prefix_cache_mib = preset.prefix_cache_mib
        if self.max_batch < 1 or self.max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        if self.max_slots is not None and self.max_slots < 1:
            raise ValueError("max_slots must be >= 1 (or None: one per batch row)")
        if self.max_prompt_bytes is not None and self.max_prompt_bytes < 1:
            raise ValueError("max_prompt_bytes must be >= 1 (or None: derived from the context length)")
        if self.adapter_cache_mib is not None and self.adapter_cache_mib < 0:
            raise ValueError("adapter_cache_mib must be >= 0 (0: no host copies of adapters no request uses)")
        if self.speculation not in SPECULATION_MODES:
            raise ValueError(f"speculation must be one of {', '.join(SPECULATION_MODES)} (got {self.speculation!r})")
        if self.prefix_cache_mib is not None and self.prefix_cache_mib < 0:
            raise ValueError("prefix_cache_mib must be >= 0 (0: no prefix cache)")
        if self.intra_op_threads < 0:
            raise ValueError("intra_op_threads must be >= 0 (0: one per physical core)")

    def engine_options(self) -> dict:
        """The keyword arguments `build_engine` takes from this configuration."""
        return dict(device=self.device, provider=self.provider, max_batch=self.max_batch, max_slots=self.max_slots,
                    intra_op_threads=self.intra_op_threads, allow_spinning=self.allow_spinning,
                    memory_arena=self.memory_arena, session_cache=self.session_cache,
                    prefix_cache_bytes=None if self.prefix_cache_mib is None else int(self.prefix_cache_mib * 2**20),
                    adapter_cache_bytes=None if self.adapter_cache_mib is None else int(self.adapter_cache_mib * MIB),
                    speculation=self.speculation)


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


async def start_server(config: ServerConfig) -> RunningServer:
    """Start serving `config.package`; returns once health says SERVING."""
    if config.malloc_arenas:  # before the engine's threads start
        limit_heap_arenas(config.malloc_arenas)
    auth = BearerAuth(read_token(config.auth_token_file), config.auth_scope) if config.auth_token_file else None
    package = await asyncio.to_thread(Package.open, config.package)
    metrics = ServerMetrics()
    # The model loads (the session is made without the GIL) while the port opens.
    core_task = asyncio.ensure_future(build_core(config, package, metrics))
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


async def build_core(config: ServerConfig, package: Package, metrics: ServerMetrics) -> ServingCore:
    """Load the model, the package's adapters (if configured) and warm up; the engine is closed on failure.

    `start_server` serves the result on its own port; a cluster replica (`loraplex.runtime.cluster`)
    serves it behind Ray Serve's proxy.
    """
    # Side by side (both load native libraries and release the GIL): start-up is the longer of the two.
    built, tokenizer = await asyncio.gather(
        asyncio.to_thread(build_engine, package, config.engine, **config.engine_options()),
        asyncio.to_thread(open_tokenizer, package.root, package.manifest.tokenizer), return_exceptions=True)
    engine = built if isinstance(built, Engine) else None
    try:
        for outcome in (built, tokenizer):
            if isinstance(outcome, BaseException):
                raise outcome
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
        if engine is not None:
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


async def serve(config: ServerConfig, drain_grace: float = 30.0) -> int:
    """Run until SIGTERM/SIGINT, then drain and exit (what `loraplex serve` runs)."""
    running = await start_server(config)
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
