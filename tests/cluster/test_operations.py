"""The cluster at work: adapter affinity, hot replace and unload across replicas, cancellation,
a replica killed mid-load, per-replica metrics. Each test leaves the adapters as it found them.

Requests are kept in flight with the cluster's brake (held in front of the replicas' engines), never
by hoping that generation outlasts a call: the outcomes do not depend on the machine's speed."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from loraplex.adapters.package.manifest import Manifest

from tests.cluster.conftest import metric_sum, wait_for
from tests.runtime.test_generation import expected

ADAPTERS = ("alpha", "beta", "gamma")
PROMPT = "The weather today"

pytestmark = pytest.mark.parametrize("cluster", ["batched"], indirect=True)  # the cluster's mechanics: one engine


@pytest.fixture(scope="module")
def manifest(tiny_package) -> Manifest:
    return Manifest.load(tiny_package)


def affinity(cluster) -> tuple[float, float]:
    text = cluster.metrics()
    return (metric_sum(text, "loraplex_adapter_affinity_total", outcome="hit"),
            metric_sum(text, "loraplex_adapter_affinity_total", outcome="load"))


def test_after_warm_up_requests_land_on_a_replica_that_holds_their_adapter(cluster):
    with cluster.client() as client:  # warm-up: each adapter finds a replica (3 adapters, 2 x 2 slots)
        for name in ADAPTERS * 2:
            client.generate(name, PROMPT, max_new_tokens=4)
    hits, loads = affinity(cluster)

    def requests(worker: int) -> int:
        with cluster.client() as client:
            for k in range(20):
                client.generate(ADAPTERS[(worker + k) % 3], PROMPT, max_new_tokens=8)
        return 20

    with ThreadPoolExecutor(4) as pool:
        sent = sum(pool.map(requests, range(4)))
    hits_after, loads_after = affinity(cluster)
    new_hits, new_loads = hits_after - hits, loads_after - loads
    assert new_hits + new_loads == sent
    assert new_hits / sent >= 0.95, f"affinity hit rate {new_hits / sent:.1%} ({new_loads:.0f} loads in {sent})"
    held = [set(r.held) for r in cluster.replicas()]
    assert all(len(h) <= 2 for h in held) and set().union(*held) == set(ADAPTERS), held


def test_metrics_are_per_replica_and_per_adapter(cluster):
    def served(text: str, replica: str) -> float:
        return metric_sum(text, "loraplex_requests_total", replica=replica, status="OK")

    replicas = {r.replica for r in cluster.replicas()}
    before = cluster.metrics()
    beta_before = metric_sum(before, "loraplex_requests_total", adapter="beta", status="OK")
    rounds = 0
    with cluster.client() as client:
        # Each replica holds at most 2 of the 3 adapters, so a few rounds over all three reach both.
        while rounds < 4 and not all(served(cluster.metrics(), r) > served(before, r) for r in replicas):
            for name in ADAPTERS:
                client.generate(name, PROMPT, max_new_tokens=2)
            rounds += 1
    text = cluster.metrics()
    for replica in replicas:
        assert served(text, replica) > served(before, replica), (replica, rounds)
    assert metric_sum(text, "loraplex_requests_total", adapter="beta", status="OK") == beta_before + rounds
    assert 'loraplex_time_to_first_token_seconds_bucket{adapter="alpha"' in text


def test_replacing_an_adapter_under_load_fails_no_request_and_every_later_request_gets_it(cluster, manifest):
    alpha, beta = manifest.adapters["alpha"], manifest.adapters["beta"]
    prompt = alpha.parity.prompts[0]
    want = {alpha.version: expected(alpha.parity.tokens[0])[0], "v2": expected(beta.parity.tokens[0])[0]}
    n = len(alpha.parity.tokens[0])
    responses: list[tuple[float, object]] = []
    errors: list[grpc.RpcError] = []
    stop = threading.Event()

    def hammer() -> None:
        with cluster.client() as client:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    responses.append((sent, client.generate("alpha", prompt, max_new_tokens=n)))
                except grpc.RpcError as exc:  # any failure is a lost request
                    errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(responses) >= 12, what="requests on the first version")
        holders = [r.replica for r in cluster.replicas() if "alpha" in r.held]
        with cluster.client() as admin:
            info = admin.load_adapter("alpha", "beta.onnx_adapter", version="v2")
            loaded_at = time.monotonic()
            wait_for(lambda: sum(1 for sent, _ in responses if sent > loaded_at) >= 12, what="requests after the Load")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert errors == []
    assert holders and info.version == "v2" and info.template.prompt == alpha.template["prompt"]  # the task stays
    assert {r.adapter_version for _, r in responses} == {alpha.version, "v2"}
    assert all(r.adapter_version == "v2" for sent, r in responses if sent > loaded_at)  # on every replica
    for _, response in responses:  # each request was served entirely by the version it reports
        assert list(response.token_ids) == want[response.adapter_version]
    for report in cluster.replicas():
        assert report.held.get("alpha", "v2") == "v2", report
    with cluster.client() as admin:  # put it back
        assert admin.load_adapter("alpha", "alpha.onnx_adapter").version == alpha.version


def test_unload_waits_for_requests_in_flight_on_any_replica_or_refuses_when_asked_not_to(cluster, manifest):
    generation = max(r.seen for r in cluster.replicas())
    with cluster.client() as client:
        with cluster.brake.held():  # the streams stay in flight until the brake is released
            streams = [client.stream("gamma", PROMPT, max_new_tokens=400, ignore_eos=True) for _ in range(6)]
            assert all(next(s).adapter == "gamma" for s in streams)  # all admitted
            with pytest.raises(grpc.RpcError) as err:
                client.unload_adapter("gamma", no_wait=True)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "in flight" in err.value.details()
            with ThreadPoolExecutor(1) as pool:
                unloading = pool.submit(client.unload_adapter, "gamma")
                wait_for(lambda: all(r.seen > generation for r in cluster.replicas()),
                         what="every replica to receive the unload")
                with pytest.raises(grpc.RpcError) as err:  # new requests are refused at once, on any replica
                    client.generate("gamma", "hi", max_new_tokens=2)
                assert err.value.code() == grpc.StatusCode.NOT_FOUND and "alpha, beta" in err.value.details()
                assert not unloading.done()  # still waiting for the streams in flight
                cluster.brake.release()
                assert [sum(len(c.token_ids) for c in s) for s in streams] == [400] * 6  # each finished in full
                assert unloading.result(60).requests_served >= 6
        assert [a.name for a in client.list_adapters()] == ["alpha", "beta"]
        assert client.load_adapter("gamma", "gamma.onnx_adapter").version == manifest.adapters["gamma"].version
        assert client.generate("gamma", "hi", max_new_tokens=2).adapter == "gamma"


def test_a_request_past_its_deadline_stops_on_its_replica(cluster):
    def cancelled() -> float:
        return metric_sum(cluster.metrics(), "loraplex_requests_total", adapter="beta", status="CANCELLED")

    before = cancelled()
    with cluster.brake.held(), cluster.client() as client:  # the request cannot finish before its deadline
        with pytest.raises(grpc.RpcError) as err:
            client.generate("beta", PROMPT, max_new_tokens=400, ignore_eos=True, timeout=0.3)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: cancelled() == before + 1, what="the replica to count the request cancelled", every=0.5)
    wait_for(lambda: metric_sum(cluster.metrics(), "loraplex_in_flight") == 0, what="no request in flight")


def test_a_replica_killed_mid_load_retries_unary_calls_elsewhere_and_the_cluster_recovers(cluster):
    """As documented: a unary call whose replica dies is sent again to another replica (the client sees
    OK); a stream that has sent its first chunk ends with UNAVAILABLE; no call hangs."""
    victim = cluster.replicas()[0]
    outcomes: dict[str, list[str]] = {"unary": [], "stream": []}
    stop = threading.Event()

    def work(worker: int) -> None:
        with cluster.client(timeout=60) as client:
            while not stop.is_set():
                adapter = ADAPTERS[worker % 3]
                kind = "stream" if worker % 2 else "unary"
                try:
                    if kind == "stream":
                        list(client.stream(adapter, PROMPT, max_new_tokens=48, ignore_eos=True))
                    else:
                        client.generate(adapter, PROMPT, max_new_tokens=48, ignore_eos=True)
                    outcomes[kind].append("OK")
                except grpc.RpcError as exc:
                    outcomes[kind].append(exc.code().name)

    def victim_in_flight() -> float:
        return metric_sum(cluster.metrics(), "loraplex_in_flight", replica=victim.replica)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    with cluster.brake.held():  # requests wait on both replicas: the kill surely catches some in flight
        for t in threads:
            t.start()
        wait_for(lambda: victim_in_flight() > 0, what="requests in flight on the replica to kill")
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = {kind: len(done) for kind, done in outcomes.items()}
    wait_for(lambda: sum(done[killed_at[kind]:].count("OK") for kind, done in outcomes.items()) >= 12,
             what="requests served after the kill")
    stop.set()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a request hung"
    assert outcomes["unary"] and set(outcomes["unary"]) == {"OK"}, sorted(set(outcomes["unary"]))
    assert set(outcomes["stream"]) <= {"OK", "UNAVAILABLE"}, sorted(set(outcomes["stream"]))

    def recovered() -> bool:
        replicas = cluster.replicas()
        return len(replicas) == 2 and victim.replica not in {r.replica for r in replicas}

    wait_for(recovered, timeout=120, what="Serve to replace the killed replica", every=1.0)
    with cluster.client() as client:
        assert client.health() == "SERVING"
        for name in ADAPTERS:
            assert client.generate(name, PROMPT, max_new_tokens=4).adapter == name
