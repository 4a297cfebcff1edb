"""Prometheus metrics of one server (its own CollectorRegistry, so several servers can share a process).

Exposed over HTTP on --metrics-port (HTTPS with the server's TLS certificate when TLS is on, and
client certificates required under mutual TLS). Labels: `adapter` (empty = base model) and `status` (a
canonical status name as gRPC spells it, "OK" for success). Requests are counted once they name a loaded adapter and
pass parameter validation: a label per unknown adapter name would let any client grow the
metric without bound.

The server counts into small metrics of its own (`Counter`, `Gauge`, `Histogram`: the part of
prometheus_client's interface it uses) and imports `prometheus_client` only when something reads
`ServerMetrics.registry` (the exporter, the HTTP `/metrics` route, a cluster replica): a server that
nobody scrapes does not hold it (2 MiB of RSS at rest, with the modules it imports). The registry's
samples are those prometheus_client's own metrics would give (`_total`, `_created`, `_bucket`, ...).
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loraplex.runtime.engines.batched.prefix_cache import PrefixCache
    from loraplex.runtime.engines.batched.speculation import Speculator
    from loraplex.runtime.server.config import ServerTLS
    from prometheus_client import CollectorRegistry

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _go_float(value: float) -> str:
    """A bucket bound as prometheus_client writes its `le` label."""
    from prometheus_client.utils import floatToGoString

    return floatToGoString(value)


class _Metric:
    """One metric family: its children by label values (one child, `()`, without labels)."""

    kind = ""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...] | list[str] = ()):
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self._lock = threading.Lock()
        self._children: dict[tuple[str, ...], Any] = {}
        if not self.labelnames:
            self._children[()] = self._child()

    def _child(self) -> Any:
        raise NotImplementedError

    def labels(self, *values: str) -> Any:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            with self._lock:
                child = self._children.setdefault(key, self._child())
        return child

    def _only(self) -> Any:
        if self.labelnames:
            raise ValueError(f"{self.name} has labels {self.labelnames}: use .labels(...)")
        return self._children[()]

    def collect(self) -> Any:
        """The prometheus_client `Metric` this family exposes (call only once prometheus_client is wanted)."""
        from prometheus_client.metrics_core import Metric

        metric = Metric(self.name, self.documentation, self.kind)
        for values, child in list(self._children.items()):
            for suffix, extra, value in child.samples():
                metric.add_sample(self.name + suffix, {**dict(zip(self.labelnames, values, strict=True)), **extra},
                                  value)
        return metric


class _CounterValue:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("a counter can only go up")
        with self._lock:
            self._value += amount

    def get(self) -> float:
        return self._value

    def samples(self) -> Iterator[tuple[str, dict[str, str], float]]:
        yield "_total", {}, self._value
        yield "_created", {}, self.created


class Counter(_Metric):
    kind = "counter"

    def _child(self) -> _CounterValue:
        return _CounterValue()

    def inc(self, amount: float = 1) -> None:
        self._only().inc(amount)


class _GaugeValue:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0.0
        self._function: Callable[[], float] | None = None

    def set(self, value: float) -> None:
        with self._lock:
            self._value, self._function = float(value), None

    def set_function(self, function: Callable[[], float]) -> None:
        """The gauge reads `function()` at each scrape."""
        self._function = function

    def get(self) -> float:
        function = self._function
        return float(function()) if function is not None else self._value

    def samples(self) -> Iterator[tuple[str, dict[str, str], float]]:
        yield "", {}, self.get()


class Gauge(_Metric):
    kind = "gauge"

    def _child(self) -> _GaugeValue:
        return _GaugeValue()

    def set(self, value: float) -> None:
        self._only().set(value)

    def set_function(self, function: Callable[[], float]) -> None:
        self._only().set_function(function)

    def get(self) -> float:
        return self._only().get()


class _HistogramValue:
    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._lock = threading.Lock()
        self._bounds = bounds  # ends with +inf
        self._counts = [0] * len(bounds)  # per bucket, not cumulative
        self._sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        index = bisect.bisect_left(self._bounds, amount)  # the first bound >= amount
        with self._lock:
            self._sum += amount
            if index < len(self._counts):
                self._counts[index] += 1

    def samples(self) -> Iterator[tuple[str, dict[str, str], float]]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative = 0.0
        for bound, count in zip(self._bounds, counts, strict=True):
            cumulative += count
            yield "_bucket", {"le": _go_float(bound)}, cumulative
        yield "_count", {}, cumulative
        yield "_sum", {}, total
        yield "_created", {}, self.created


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...] | list[str] = (),
                 buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self._bounds = tuple(sorted(float(b) for b in buckets))
        if self._bounds[-1] != float("inf"):
            self._bounds += (float("inf"),)
        super().__init__(name, documentation, labelnames)

    def _child(self) -> _HistogramValue:
        return _HistogramValue(self._bounds)

    def observe(self, amount: float) -> None:
        self._only().observe(amount)


class _Families:
    """The server's own metrics, as a prometheus_client collector."""

    def __init__(self, families: list[_Metric]):
        self._families = families

    def collect(self):
        return [family.collect() for family in list(self._families)]


class ServerMetrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._registry: CollectorRegistry | None = None
        self._families: list[_Metric] = []
        self._collectors: list[Any] = [_Families(self._families)]
        self.requests = self.counter("loraplex_requests", "Generation requests finished, by adapter and status",
                                     ["adapter", "status"])
        self.tokens = self.counter("loraplex_completion_tokens", "Completion tokens produced, by adapter and status",
                                   ["adapter", "status"])
        self.prompt_tokens = self.counter("loraplex_prompt_tokens", "Prompt tokens processed", ["adapter"])
        self.queue_depth = self._add(Gauge("loraplex_queue_depth", "Requests waiting for a decoding slot"))
        self.in_flight = self._add(Gauge("loraplex_in_flight", "Requests admitted and not finished"))
        self.ttft = self._add(Histogram("loraplex_time_to_first_token_seconds",
                                        "Request received -> first token decoded", ["adapter"]))
        self.token_latency = self._add(Histogram("loraplex_inter_token_latency_seconds",
                                                 "Time between consecutive tokens of a request", ["adapter"]))
        self.loaded_adapters = self._add(Gauge("loraplex_loaded_adapters", "Adapters loaded (current versions)"))
        self.adapter_loads = self.counter("loraplex_adapter_loads", "Adapter Load/Unload calls by action and status",
                                          ["action", "status"])

    def _add(self, family: Any) -> Any:
        with self._lock:
            if any(f.name == family.name for f in self._families):
                raise ValueError(f"duplicated metric {family.name}")
            self._families.append(family)
        return family

    def counter(self, name: str, documentation: str, labelnames: list[str] | tuple[str, ...] = ()) -> Counter:
        """A counter exported with this server's metrics (`name` without `_total`)."""
        return self._add(Counter(name, documentation, labelnames))

    def add_collector(self, collector: Any) -> None:
        """A prometheus_client collector (its `collect()` yields metric families) exported from the registry on."""
        with self._lock:
            self._collectors.append(collector)
            registry = self._registry
        if registry is not None:
            registry.register(collector)

    @property
    def registry(self) -> CollectorRegistry:
        """This server's prometheus_client registry, made (and prometheus_client imported) at the first read."""
        with self._lock:
            if self._registry is None:
                from prometheus_client import CollectorRegistry

                registry = CollectorRegistry()
                for collector in self._collectors:
                    registry.register(collector)
                self._registry = registry
            return self._registry

    def watch_prefix_cache(self, cache: PrefixCache | None) -> None:
        """Export the batched engine's prefix cache counters (nothing when it has none)."""
        if cache is not None:
            self.add_collector(_PrefixCacheCollector(cache))

    def watch_speculation(self, speculator: Speculator | None) -> None:
        """Export the batched engine's drafted and accepted tokens per adapter (nothing without it)."""
        if speculator is not None:
            self.add_collector(_SpeculationCollector(speculator))

    def serve(self, port: int, host: str = "127.0.0.1", tls: ServerTLS | None = None):
        """Start the HTTP(S) exporter; returns (server, bound port)."""
        from prometheus_client import start_http_server

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
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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
        from prometheus_client.core import CounterMetricFamily

        drafted = CounterMetricFamily("loraplex_draft_tokens", "Drafted tokens verified by speculative decoding, "
                                      "by adapter", labels=["adapter"])
        accepted = CounterMetricFamily("loraplex_draft_accepted_tokens", "Drafted tokens the model accepted "
                                       "(each saves a decode step), by adapter", labels=["adapter"])
        for name, (verified, kept) in list(self._speculator.by_adapter.items()):
            drafted.add_metric([name], verified)
            accepted.add_metric([name], kept)
        yield drafted
        yield accepted
