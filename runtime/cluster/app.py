"""The Serve application and `loraplex serve-ray`'s loop.

Three deployments, one application:
- `LoraplexFront` (ingress, `front.ClusterFront`): what Serve's gRPC proxy calls;
- `LoraplexEngine` (`replica.EngineReplica`): the engine replicas, routed by adapter
  (`routing.AdapterAffinityRouter`), autoscaled on ongoing requests when asked;
- `AdapterCatalog` (`CatalogReplica`): one replica holding the cluster's adapter set.

`serve_cluster` is what the CLI runs: start (or join) Ray, start Serve's proxies with the
loraplex services, deploy, print the target, and on SIGTERM/SIGINT delete the application, which
drains every replica (Serve stops routing to it and waits up to `drain_grace` for its requests).
`app_builder` builds the same application from a Serve config file (`serve run`, KubeRay's
RayService), where Serve's own `grpc_options` must list `config.GRPC_SERVICERS`.
"""

from __future__ import annotations

import logging
import signal
import threading
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


def build_application(config: ClusterConfig) -> Application:
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
    engine = serve.deployment(EngineReplica, **engine_options).bind(config.server, catalog, config.slots)
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


def deploy(config: ClusterConfig, address: str | None = None) -> None:
    """Join (or start) Ray, start Serve's proxies with the loraplex services, deploy; returns once running."""
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    serve.start(
        http_options=HTTPOptions(host=config.http_host, port=config.http_port),
        grpc_options=gRPCOptions(port=config.grpc_port, grpc_servicer_functions=list(GRPC_SERVICERS)),
    )
    serve.run(build_application(config), name=config.app_name, route_prefix=f"/{config.app_name}")


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
