"""Prometheus metrics of one server (its own CollectorRegistry, so several servers can share a process).

Exposed over HTTP on --metrics-port (HTTPS with the server's TLS certificate when TLS is on, and
client certificates required under mutual TLS). Labels: `adapter` (empty = base model) and `status` (a
canonical status name as gRPC spells it, "OK" for success). Requests are counted once they name a loaded adapter and
pass parameter validation: a label per unknown adapter name would let any client grow the
metric without bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

if TYPE_CHECKING:
    from loraplex.runtime.server.app import ServerTLS

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class ServerMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "loraplex_requests",
            "Generation requests finished, by adapter and status",
            ["adapter", "status"],
            registry=r,
        )
        self.tokens = Counter(
            "loraplex_completion_tokens",
            "Completion tokens produced, by adapter and status",
            ["adapter", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("loraplex_prompt_tokens", "Prompt tokens processed", ["adapter"], registry=r)
        self.queue_depth = Gauge("loraplex_queue_depth", "Requests waiting for a decoding slot", registry=r)
        self.in_flight = Gauge("loraplex_in_flight", "Requests admitted and not finished", registry=r)
        self.ttft = Histogram(
            "loraplex_time_to_first_token_seconds",
            "Request received -> first token decoded",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.token_latency = Histogram(
            "loraplex_inter_token_latency_seconds",
            "Time between consecutive tokens of a request",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.loaded_adapters = Gauge("loraplex_loaded_adapters", "Adapters loaded (current versions)", registry=r)
        self.adapter_loads = Counter(
            "loraplex_adapter_loads",
            "Adapter Load/Unload calls by action and status",
            ["action", "status"],
            registry=r,
        )

    def serve(self, port: int, host: str = "127.0.0.1", tls: ServerTLS | None = None):
        """Start the HTTP(S) exporter; returns (server, bound port)."""
        secure = {}
        if tls is not None:
            secure = dict(certfile=str(tls.cert), keyfile=str(tls.key))
            if tls.client_ca is not None:
                secure.update(client_cafile=str(tls.client_ca), client_auth_required=True)
        server, _thread = start_http_server(port, addr=host, registry=self.registry, **secure)
        return server, server.server_port
