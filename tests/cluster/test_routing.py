"""Adapter-affinity routing decisions, without Ray running: ranks, the router's residency model."""

from __future__ import annotations

from loraplex.runtime.cluster.routing import FRESH_S, AdapterResidency, ReplicaView, rank_replicas


def view(key, adapters=(), slots=2, queue=0) -> ReplicaView:
    return ReplicaView(key, list(adapters), slots, queue)


def test_holders_come_first_and_a_free_slot_second():
    replicas = [view("r1", ["alpha", "beta"]), view("r2", ["gamma"]), view("r3", ["alpha"])]
    assert rank_replicas("alpha", replicas, spill_queue=4) == [["r1", "r3"], ["r2"]]


def test_a_saturated_holder_spills_to_an_idler_replica_with_a_free_slot_only():
    busy = [view("r1", ["alpha", "beta"], queue=6), view("r2", ["gamma"], queue=1), view("r3", ["x", "y"], queue=0)]
    assert rank_replicas("alpha", busy, spill_queue=4) == [["r2"], ["r1"]]  # r3 is full: never evicts to spill
    calm = [view("r1", ["alpha", "beta"], queue=2), view("r2", ["gamma"], queue=0)]
    assert rank_replicas("alpha", calm, spill_queue=4) == [["r1"], ["r2"]]


def test_without_a_holder_free_slots_fill_fewest_adapters_first_then_a_full_replica_evicts():
    replicas = [view("r1", ["a", "b"]), view("r2", ["c"]), view("r3", []), view("r4", ["d"])]
    assert rank_replicas("e", replicas, spill_queue=4) == [["r3"], ["r2", "r4"], ["r1"]]
    assert rank_replicas("e", [view("r1", ["a", "b"]), view("r2", ["c", "d"])], spill_queue=4) == [["r1", "r2"]]


def test_residency_learns_at_routing_time_and_models_each_replicas_lru():
    now = [100.0]
    residency = AdapterResidency(slots=2, clock=lambda: now[0])
    for adapter in ("a", "b", "a", "c"):  # the replica's LRU drops b, the least recently used
        residency.routed("r1", adapter)
    assert list(residency.held["r1"]) == ["a", "c"]


def test_reports_correct_the_model_but_do_not_erase_what_was_just_routed():
    now = [100.0]
    residency = AdapterResidency(slots=2, clock=lambda: now[0])
    residency.routed("r1", "a")
    residency.reported({"r1": {"b"}, "r2": {"c"}})  # r1 has not reported a yet
    assert set(residency.held["r1"]) == {"a", "b"} and list(residency.held["r2"]) == ["c"]
    now[0] += FRESH_S + 1
    residency.reported({"r1": {"b"}, "r2": {"c"}})  # still not there: the replica evicted it
    assert list(residency.held["r1"]) == ["b"]
    residency.forget("r2")
    assert "r2" not in residency.held
