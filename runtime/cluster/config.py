"""`ClusterConfig`: how `loraplex serve-ray` runs a package on Ray Serve (no ray import here).

Each engine replica runs what `loraplex serve` runs, configured by the same `ServerConfig`
(engine, device, provider, batch, slots, queue, adapter root, auth); the rest says how many
replicas, how they scale, what each reserves, and where Serve's proxies listen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loraplex.runtime.server import ServerConfig

GRPC_SERVICERS = (
    "loraplex.v1.generation_pb2_grpc.add_GenerationServicer_to_server",
    "loraplex.v1.adapters_pb2_grpc.add_AdaptersServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
)


@dataclass
class ClusterConfig:
    server: ServerConfig  # what each replica serves and how (the `serve` options); host/port unused
    app_name: str = "loraplex"  # Serve application name: clients send it as `application` metadata when
    #                             the cluster runs several applications
    grpc_port: int = 9000  # Serve's gRPC proxy (every node with a proxy listens on it)
    http_port: int = 8000  # Serve's HTTP proxy: GET /<app_name>/metrics
    http_host: str = "127.0.0.1"
    replicas: int = 1  # engine replicas (the minimum when autoscaling)
    max_replicas: int | None = None  # > replicas: autoscale on queue depth between the two
    target_ongoing_requests: float | None = None  # autoscaling target per replica (default: max_batch)
    replica_cpus: float = 1.0  # CPUs Ray reserves per engine replica (fractions allowed)
    replica_gpus: float = 0.0
    front_replicas: int = 1  # front end replicas (no model; on several nodes: one per node, see docs/cluster.md)
    drain_grace: float = 30.0  # seconds a stopping replica waits for its requests in flight
    ray_options: dict[str, Any] = field(default_factory=dict)  # extra ray_actor_options for engine replicas
    affinity_router: bool = True  # False: Serve's own multiplexed routing (for comparison: bench/cluster.py)

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.front_replicas < 1:
            raise ValueError("replicas and front_replicas must be >= 1")
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= replicas ({self.replicas})")
        if self.replica_cpus < 0 or self.replica_gpus < 0:
            raise ValueError("replica_cpus and replica_gpus must be >= 0")
        if self.server.intra_op_threads == 0 and self.replica_cpus >= 1:
            # onnxruntime would start one thread per physical core in every replica of a node
            self.server.intra_op_threads = int(self.replica_cpus)
        elif self.server.intra_op_threads == 0:
            self.server.intra_op_threads = 1

    @property
    def slots(self) -> int:
        """Adapters one replica keeps resident: its bank's slots (`max_slots`, default one per batch row)."""
        return self.server.max_slots or self.server.max_batch

    @property
    def max_ongoing_requests(self) -> int:
        """Serve's per-replica limit, equal to the replica's own admission (running + queued)."""
        return self.server.max_batch + self.server.max_queue

    def autoscaling(self) -> dict[str, Any] | None:
        if self.max_replicas is None or self.max_replicas == self.replicas:
            return None
        return {
            "min_replicas": self.replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests or self.server.max_batch,
        }

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> ClusterConfig:
        """From a flat mapping (a Serve config file's `args`): ServerConfig's fields and this class's."""
        server_fields = set(ServerConfig.__dataclass_fields__)
        own = {k: v for k, v in options.items() if k in cls.__dataclass_fields__ and k != "server"}
        server = {k: v for k, v in options.items() if k in server_fields}
        unknown = set(options) - set(own) - set(server)
        if unknown:
            raise ValueError(f"unknown cluster option(s): {', '.join(sorted(unknown))}")
        return cls(server=ServerConfig(**server), **own)
