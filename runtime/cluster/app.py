"""The Serve application and `loraplex serve-ray`'s loop.

Three deployments, one application:
- `LoraplexFront` (ingress, `front.ClusterFront`): what Serve's gRPC proxy calls;
- `LoraplexEngine` (`replica.EngineReplica`): the engine replicas, routed by adapter
  (`routing.AdapterAffinityRouter`), autoscaled on ongoing requests when asked;
- `AdapterCatalog` (`CatalogReplica`): one replica holding the cluster's adapter set.

`serve_cluster` is what the CLI runs: start (or join) Ray, start Serve's proxies with the
loraplex services, deploy, print the target, and on SIGTERM/SIGINT delete the application, which
drains every replica (Serve stops routing to it and waits up to `drain_grace` for its requests).
A Ray it starts itself (no address) is a single node on 127.0.0.1 (`start_local_ray`).
`app_builder` builds the same application from a Serve config file (`serve run`, KubeRay's
RayService), where Serve's own `grpc_options` must list `config.GRPC_SERVICERS`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
from loraplex.adapters.package.reader import Package
from loraplex.runtime.cluster.catalog import HEARTBEAT_S, AdapterCatalog
from loraplex.runtime.cluster.config import GRPC_SERVICERS, ClusterConfig
from loraplex.runtime.cluster.front import ClusterFront
from loraplex.runtime.cluster.replica import EngineReplica
from loraplex.runtime.cluster.routing import AdapterAffinityRouter
from loraplex.runtime.errors import LoraplexError
from loraplex.runtime.server import ServerConfig
from ray import serve
from ray.serve.config import HTTPOptions, RequestRouterConfig, gRPCOptions
from ray.serve.deployment import Application

log = logging.getLogger(__name__)

FRONT, ENGINE, CATALOG = "LoraplexFront", "LoraplexEngine", "AdapterCatalog"
LOOPBACK = "127.0.0.1"


class CatalogReplica(AdapterCatalog):
    """The catalog as a Serve deployment, built from the replicas' own ServerConfig.

    A refused Load or Unload is returned, not raised: it is the client's error, not a fault of the
    catalog, so Serve neither logs it as a failed request nor counts it (the front end raises it).
    """

    def __init__(self, config: ServerConfig):
        package = Package.open(config.package)
        super().__init__(package, Path(config.adapter_root or package.adapter_dir))

    async def load(self, name: str, path: str, version: str | None = None):
        try:
            return await super().load(name, path, version)
        except LoraplexError as exc:
            return exc

    async def unload(self, name: str, wait: bool = True):
        try:
            return await super().unload(name, wait)
        except LoraplexError as exc:
            return exc

    # Serve runs a deployment's plain methods in a thread pool: these read on the catalog's loop.
    async def reports(self):
        return self.replicas()

    async def healthy(self) -> bool:
        return self.serving()


def start_local_ray(**options: Any) -> Any:
    """Start a single-node Ray whose servers (GCS, raylet, workers, agents) listen on 127.0.0.1 only.

    Ray replaces a loopback node address with the machine's own unless its multi-node support is
    off (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, honoured on every platform despite the name): then
    the node's address is 127.0.0.1 and Ray's servers bind to it. Each Ray process reads the
    setting at import, so it is set for the processes `ray.init` starts and in this process's
    constants, for the start only. No other node can join this Ray: for several nodes, start Ray
    (`ray start --head`) and pass its address. Returns `ray.init`'s context.
    """
    with _single_node():
        return ray.init(_node_ip_address=LOOPBACK, **options)


@contextlib.contextmanager
def _single_node() -> Iterator[None]:
    from ray._private import ray_constants

    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved_env, saved_constant = os.environ.get(name), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[name], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_constant
        if saved_env is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved_env


def _on_loopback(address: str) -> bool:
    """True for a GCS address `host:port` on 127.0.0.1 (else Ray would look for its node at the machine's address)."""
    host, _, port = address.rpartition(":")
    return port.isdigit() and host.strip("[]") in ("127.0.0.1", "localhost", "::1")


def build_application(config: ClusterConfig, replica_class: type[EngineReplica] = EngineReplica) -> Application:
    """The application; `replica_class` is the engine deployment's class (tests pass a subclass)."""
    catalog = serve.deployment(
        CatalogReplica, name=CATALOG, num_replicas=1, max_ongoing_requests=10_000,
        ray_actor_options={"num_cpus": 0},
        graceful_shutdown_timeout_s=HEARTBEAT_S + 1, graceful_shutdown_wait_loop_s=0.5,
    ).bind(config.server)
    engine_options: dict[str, Any] = dict(
        name=ENGINE,
        max_ongoing_requests=config.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.replica_cpus, "num_gpus": config.replica_gpus, **config.ray_options},
        graceful_shutdown_timeout_s=config.drain_grace,
        graceful_shutdown_wait_loop_s=0.2,
        health_check_period_s=5.0,
    )
    if config.affinity_router:
        engine_options["request_router_config"] = RequestRouterConfig(
            request_router_class=AdapterAffinityRouter,
            request_router_kwargs={"slots": config.slots, "spill_queue": config.server.max_batch},
        )
    autoscaling = config.autoscaling()
    if autoscaling is None:
        engine_options["num_replicas"] = config.replicas
    else:
        engine_options["autoscaling_config"] = autoscaling
    engine = serve.deployment(replica_class, **engine_options).bind(config.server, catalog, config.slots)
    front_options: dict[str, Any] = {}
    if config.front_replicas > 1:
        front_options["max_replicas_per_node"] = 1  # one per node: the hop after the node's proxy stays local
    return serve.deployment(
        ClusterFront, name=FRONT, num_replicas=config.front_replicas, max_ongoing_requests=10_000,
        ray_actor_options={"num_cpus": 0}, **front_options,
    ).bind(config, engine, catalog)


def app_builder(args: dict[str, Any]) -> Application:
    """For Serve config files: `import_path: loraplex.runtime.cluster.app:app_builder`, `args` are
    `ServerConfig`/`ClusterConfig` fields (`package`, `engine`, `max_batch`, `replicas`...)."""
    return build_application(ClusterConfig.from_options(dict(args)))


def deploy(config: ClusterConfig, address: str | None = None,
           replica_class: type[EngineReplica] = EngineReplica) -> None:
    """Join (or start) Ray, start Serve's proxies with the loraplex services, deploy; returns once running."""
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address is None:  # as Ray decides: no address, a new Ray
            start_local_ray(include_dashboard=False, logging_level=logging.WARNING)
        elif _on_loopback(address):  # a Ray on 127.0.0.1 (as `start_local_ray` makes): join it as 127.0.0.1
            with _single_node():
                ray.init(address=address, _node_ip_address=LOOPBACK, include_dashboard=False,
                         logging_level=logging.WARNING)
        else:
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    serve.start(
        http_options=HTTPOptions(host=config.http_host, port=config.http_port),
        grpc_options=gRPCOptions(port=config.grpc_port, grpc_servicer_functions=list(GRPC_SERVICERS)),
    )
    serve.run(build_application(config, replica_class), name=config.app_name, route_prefix=f"/{config.app_name}")


def undeploy(config: ClusterConfig) -> None:
    """Delete the application: every replica stops taking requests and drains those in flight."""
    serve.delete(config.app_name)


def serve_cluster(config: ClusterConfig, address: str | None = None) -> int:
    """Run until SIGTERM/SIGINT, then drain and remove the application (what `loraplex serve-ray` runs)."""
    try:
        deploy(config, address)
    except BaseException:
        if ray.is_initialized() and config.app_name in serve.status().applications:
            undeploy(config)  # a failed deployment would stay behind, retrying
        raise
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs its own (exit at once)
        signal.signal(sig, lambda *_: stop.set())
    replicas = f"{config.replicas}-{config.max_replicas}" if config.autoscaling() else str(config.replicas)
    print(f"loraplex cluster serving on {ray.util.get_node_ip_address()}:{config.grpc_port} "
          f"(application {config.app_name}, {replicas} replica(s))", flush=True)
    print(f"metrics on http://{config.http_host}:{config.http_port}/{config.app_name}/metrics", flush=True)
    stop.wait()
    log.info("signal received: draining the application %s", config.app_name)
    undeploy(config)
    log.info("stopped")
    return 0
