"""Every replica's Prometheus metrics as one scrape, each sample labelled with its replica.

A replica's metrics are the single server's (`loraplex_requests_total{adapter,status}`, queue
depth, latency histograms...) plus `loraplex_adapter_affinity_total{adapter,outcome}`. Replicas
have no port of their own: the front end gathers their texts through the catalog and serves them
here, so one scrape target covers the cluster and per-replica, per-adapter series stay apart.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families


def federate(texts: Mapping[str, str]) -> str:
    """Prometheus text of all `texts` (replica -> its exposition), samples labelled `replica`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Relabelled(texts))
    return generate_latest(registry).decode()


class _Relabelled:
    def __init__(self, texts: Mapping[str, str]):
        self.texts = texts

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for replica, text in sorted(self.texts.items()):
            for family in text_string_to_metric_families(text):
                target = merged.get(family.name)
                if target is None:
                    target = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                for sample in family.samples:
                    labels = {"replica": replica, **sample.labels}
                    target.add_sample(sample.name, labels, sample.value, sample.timestamp, sample.exemplar)
        yield from merged.values()
