"""Adapter-affinity routing: send a request to a replica that already holds its adapter.

Serve's multiplexing routes by model id (here: the adapter name) with what replicas report
about the models they hold. Those reports travel replica -> controller -> router and arrive
100 ms or more late, and when no replica reports the id, Serve picks among the replicas with the
fewest models. A burst of first requests for different adapters thus lands on replicas at
random, a replica exceeds its slots, evicts, and the evictions feed on themselves (a probe with 4
adapters, 2 replicas of 2 slots, round-robin requests: 12 loads in 40 requests).

`AdapterAffinityRouter` keeps its own view of each replica's adapters, learned the moment it
routes a request (no waiting for reports) and reconciled with the replicas' reports, and models
each replica's LRU of `slots` adapters as the replica does. For a request for adapter A it
offers, in order:
1. replicas holding A (the least loaded of them takes it);
2. if those are saturated (queue at `spill_queue` or more) replicas with a free slot and a
   shorter queue: a hot adapter spreads to an idle replica instead of queueing;
3. with no holder: replicas with a free slot, fewest adapters first; then the others (one
   of them evicts its least recently used adapter).
Requests for the base model go to the least loaded replica.

With one front end replica all routing goes through one view; with several (one per node), each
learns from its own traffic and all converge through the replicas' reports.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from ray.serve.request_router import PendingRequest, ReplicaID, ReplicaResult, RequestRouter, RunningReplica

FRESH_S = 2.0  # routed-here facts younger than this survive a report that does not show them yet


@dataclass(frozen=True)
class ReplicaView:
    """What the router believes about one replica."""

    key: Hashable
    adapters: Sequence[str]  # least recently used first
    slots: int
    queue: int  # requests in flight there (0 when unknown)


def rank_replicas(adapter: str, replicas: Sequence[ReplicaView], spill_queue: int) -> list[list[Hashable]]:
    """Replica keys in order of preference for a request for `adapter` (see the module docstring)."""
    holders = [r for r in replicas if adapter in r.adapters]
    free = [r for r in replicas if adapter not in r.adapters and len(r.adapters) < r.slots]
    if holders:
        least = min(r.queue for r in holders)
        idle = [r for r in free if r.queue < least]
        keys = [r.key for r in holders]
        if least >= spill_queue and idle:
            return [[r.key for r in idle], keys]
        return [keys, [r.key for r in free]] if free else [keys]
    ranks: list[list[Hashable]] = []
    for count in sorted({len(r.adapters) for r in free}):
        ranks.append([r.key for r in free if len(r.adapters) == count])
    free_keys = {r.key for r in free}
    full = [r.key for r in replicas if r.key not in free_keys]
    if full:
        ranks.append(full)
    return ranks


class AdapterResidency:
    """The router's model of which adapters each replica holds, in LRU order."""

    def __init__(self, slots: int, clock: Callable[[], float] = time.monotonic):
        self.slots = slots
        self.clock = clock
        self.held: dict[Hashable, OrderedDict[str, float]] = {}

    def routed(self, replica: Hashable, adapter: str) -> None:
        """A request for `adapter` went to `replica`: it holds it now, most recently used."""
        lru = self.held.setdefault(replica, OrderedDict())
        lru[adapter] = self.clock()
        lru.move_to_end(adapter)
        while len(lru) > self.slots:
            lru.popitem(last=False)

    def reported(self, reports: dict[Hashable, set[str]]) -> None:
        """Replicas' own reports: authoritative, except for what was routed there a moment ago."""
        now = self.clock()
        held = {}
        for replica, adapters in reports.items():
            mine = self.held.get(replica, OrderedDict())
            kept = OrderedDict((a, t) for a, t in mine.items() if a in adapters or now - t < FRESH_S)
            for adapter in sorted(adapters - kept.keys()):
                kept[adapter] = 0.0
                kept.move_to_end(adapter, last=False)  # recency unknown: treat as least recent
            held[replica] = kept
        self.held = held

    def forget(self, replica: Hashable) -> None:
        self.held.pop(replica, None)


class AdapterAffinityRouter(RequestRouter):
    """Serve request router for the engine replicas (`request_router_kwargs`: slots, spill_queue)."""

    def initialize_state(self, slots: int = 1, spill_queue: int = 8) -> None:
        self._residency = AdapterResidency(slots)
        self._spill_queue = spill_queue

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._residency.reported({r.replica_id: set(r.multiplexed_model_ids) for r in replicas})

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._residency.forget(replica_id)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult) -> None:
        adapter = pending_request.metadata.multiplexed_model_id
        if adapter:
            self._residency.routed(replica_id, adapter)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # all ranks busy: back off, do not spin
        adapter = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if not adapter:
            return [candidate_replicas]
        by_id = {r.replica_id: r for r in candidate_replicas}
        views = [
            ReplicaView(r.replica_id, list(self._residency.held.get(r.replica_id, ())), self._residency.slots,
                        self.replica_queue_len_cache.get(r.replica_id) or 0)
            for r in candidate_replicas
        ]
        return [[by_id[key] for key in rank] for rank in rank_replicas(adapter, views, self._spill_queue)]
