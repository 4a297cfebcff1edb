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
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from loraplex.runtime.engines.batched.prefix_cache import PrefixCache
    from loraplex.runtime.engines.batched.speculation import Speculator
    from loraplex.runtime.server.config import ServerTLS

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

    def watch_prefix_cache(self, cache: PrefixCache | None) -> None:
        """Export the batched engine's prefix cache counters (nothing when it has none)."""
        if cache is not None:
            self.registry.register(_PrefixCacheCollector(cache))

    def watch_speculation(self, speculator: Speculator | None) -> None:
        """Export the batched engine's drafted and accepted tokens per adapter (nothing without it)."""
        if speculator is not None:
            self.registry.register(_SpeculationCollector(speculator))

    def serve(self, port: int, host: str = "127.0.0.1", tls: ServerTLS | None = None):
        """Start the HTTP(S) exporter; returns (server, bound port)."""
        secure = {}
        if tls is not None:
            secure = dict(certfile=str(tls.cert), keyfile=str(tls.key))
            if tls.client_ca is not None:
                secure.update(client_cafile=str(tls.client_ca), client_auth_required=True)
        server, _thread = start_http_server(port, addr=host, registry=self.registry, **secure)
        return server, server.server_port


class _PrefixCacheCollector:
    """The prefix cache's counters, read at each scrape (the engine thread writes them)."""

    def __init__(self, cache: PrefixCache):
        self._cache = cache

    def collect(self):
        stats, cache = self._cache.stats, self._cache
        for name, doc, value in (
            ("loraplex_prefix_cache_lookups", "Requests admitted with the prefix cache on", stats.lookups),
            ("loraplex_prefix_cache_hits", "Requests that started from a cached prompt prefix", stats.hits),
            ("loraplex_prefix_cache_reused_tokens", "Prompt tokens whose KV came from the prefix cache",
             stats.tokens_reused),
            ("loraplex_prefix_cache_prompt_tokens", "Prompt tokens of the requests looked up", stats.prompt_tokens),
            ("loraplex_prefix_cache_evicted_blocks", "Blocks evicted to stay within the byte bound",
             stats.evicted_blocks),
            ("loraplex_prefix_cache_dropped_blocks", "Blocks dropped with their unloaded adapter",
             stats.dropped_blocks),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        yield GaugeMetricFamily("loraplex_prefix_cache_hit_rate", "Share of looked-up requests that hit",
                                value=stats.hits / stats.lookups if stats.lookups else 0.0)
        yield GaugeMetricFamily("loraplex_prefix_cache_bytes", "Bytes of KV the prefix cache holds", value=cache.bytes)
        yield GaugeMetricFamily("loraplex_prefix_cache_capacity_bytes", "The prefix cache's byte bound",
                                value=cache.max_bytes)


class _SpeculationCollector:
    """Speculative decoding's draft counts per adapter, read at each scrape (the engine thread writes them)."""

    def __init__(self, speculator: Speculator):
        self._speculator = speculator

    def collect(self):
        drafted = CounterMetricFamily("loraplex_draft_tokens", "Drafted tokens verified by speculative decoding, "
                                      "by adapter", labels=["adapter"])
        accepted = CounterMetricFamily("loraplex_draft_accepted_tokens", "Drafted tokens the model accepted "
                                       "(each saves a decode step), by adapter", labels=["adapter"])
        for name, (verified, kept) in list(self._speculator.by_adapter.items()):
            drafted.add_metric([name], verified)
            accepted.add_metric([name], kept)
        yield drafted
        yield accepted
