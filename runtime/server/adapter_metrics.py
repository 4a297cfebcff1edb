"""Prometheus metrics of the adapters' tiers (`engines.adapter_cache`), on a server's own registry.

- `loraplex_adapter_lookups_total{adapter, tier}`: requests by where they found their adapter:
  `slot` (a batched engine bank slot), `host` (a host copy) or `disk` (a miss: its file read again);
- `loraplex_adapter_evictions_total{adapter}`: host copies dropped for the budget;
- `loraplex_adapter_cache_bytes` / `loraplex_adapter_cache_budget_bytes`: host copies now, and the bound.
Labels name loaded adapters only (a request is counted once it holds one).
"""

from __future__ import annotations

from loraplex.runtime.engines.adapter_cache import HostCache
from loraplex.runtime.server.metrics import ServerMetrics


def watch_adapter_cache(metrics: ServerMetrics, cache: HostCache | None) -> None:
    """Count `cache`'s lookups and evictions into `metrics` and export its size (nothing without one)."""
    if cache is None:
        return
    lookups = metrics.counter("loraplex_adapter_lookups", "Requests by where they found their adapter (disk: a miss)",
                              ["adapter", "tier"])
    evictions = metrics.counter("loraplex_adapter_evictions", "Adapter host copies dropped for the cache budget",
                                ["adapter"])

    def observe(name: str, event: str) -> None:
        if event == "evicted":
            evictions.labels(name).inc()
        else:
            lookups.labels(name, event).inc()

    cache.observer = observe
    metrics.add_collector(_CacheCollector(cache))


class _CacheCollector:
    def __init__(self, cache: HostCache):
        self._cache = cache

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        yield GaugeMetricFamily("loraplex_adapter_cache_bytes", "Bytes of adapter host copies",
                                value=self._cache.bytes)
        yield GaugeMetricFamily("loraplex_adapter_cache_budget_bytes", "The adapter host copies' byte bound",
                                value=self._cache.budget)
