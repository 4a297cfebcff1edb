"""The cluster's adapter catalog without Ray: checks, generations, waiting for replicas, reports.

Replicas are simulated by tasks that long-poll `watch` as engine replicas do, applying each state
at once (or holding it, to play a replica that is still draining). Liveness runs on a fake clock
that only the test moves: a stalled machine never makes a replica look gone.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from loraplex.adapters.package.reader import Package
from loraplex.runtime.cluster.catalog import AdapterCatalog, ReplicaReport
from loraplex.runtime.errors import (
    AdapterBusy,
    AdapterIncompatible,
    AdapterNotFound,
    InvalidRequest,
    PermissionDenied,
)

HEARTBEAT = 0.05  # how often a watch returns (real time); liveness: three heartbeats on the fake clock


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeReplica:
    """Follows the catalog; `hold` stops it applying new generations (a replica draining)."""

    def __init__(self, catalog: AdapterCatalog, name: str):
        self.catalog, self.name = catalog, name
        self.report = ReplicaReport(name)
        self.hold = False
        self.task = asyncio.get_running_loop().create_task(self._follow())

    async def _follow(self) -> None:
        while True:
            update = await self.catalog.watch(self.report)
            state = update.state
            applied = self.report.applied if self.hold else state.generation
            self.report = ReplicaReport(self.name, state.catalog_id, seen=state.generation, applied=applied,
                                        answered=update.round, held=dict(self.report.held),
                                        in_flight=dict(self.report.in_flight), served=dict(self.report.served))

    def stop(self) -> None:
        self.task.cancel()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def catalog(tiny_package: Path, cluster_adapter_root: Path, clock: FakeClock) -> AdapterCatalog:
    return AdapterCatalog(Package.open(tiny_package), cluster_adapter_root, heartbeat_s=HEARTBEAT, clock=clock)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def until(condition) -> None:
    """Wait for state that other tasks reach (bounded by `run`'s timeout)."""
    while not condition():
        await asyncio.sleep(0.005)


def live(catalog: AdapterCatalog) -> list[str]:
    return [r.replica for r in catalog.replicas()]


def test_starts_with_the_package_adapters_and_checks_a_load_once_for_all(catalog):
    assert catalog.state.names() == ["alpha", "beta", "gamma"]
    before = catalog.state

    async def bad_loads():
        for name, path, error in (("delta", "../outside/alpha.onnx_adapter", PermissionDenied),
                                  ("delta", "escape.onnx_adapter", PermissionDenied),
                                  ("bad/name", "alpha.onnx_adapter", InvalidRequest),
                                  ("delta", "garbage.onnx_adapter", AdapterIncompatible)):
            with pytest.raises(error):
                await catalog.load(name, path)

    run(bad_loads())
    assert catalog.state is before  # nothing recorded


def test_a_load_returns_once_every_live_replica_applied_it_and_a_replacement_keeps_the_task(catalog):
    async def scenario():
        replicas = [FakeReplica(catalog, f"r{i}") for i in range(2)]
        await until(lambda: live(catalog) == ["r0", "r1"])
        template = catalog.state.entries["alpha"].adapter.template
        replicas[1].hold = True
        loading = asyncio.ensure_future(catalog.load("alpha", "beta.onnx_adapter", "v2"))
        await asyncio.sleep(5 * HEARTBEAT)  # heartbeats pass; r1, still polling, stays live on the clock
        assert not loading.done()  # r1 has not applied it
        replicas[1].hold = False
        checked = await loading
        assert checked.version == "v2" and checked.template == template
        assert all(r.report.applied >= catalog.state.generation for r in replicas)
        for r in replicas:
            r.stop()

    run(scenario())


def test_a_replica_that_stops_polling_is_not_waited_for(catalog, clock):
    async def scenario():
        alive, gone = FakeReplica(catalog, "alive"), FakeReplica(catalog, "gone")
        await until(lambda: live(catalog) == ["alive", "gone"])
        gone.stop()
        before = catalog.state.generation
        loading = asyncio.ensure_future(catalog.load("delta", "gamma.onnx_adapter"))
        await until(lambda: alive.report.applied > before)
        await asyncio.sleep(5 * HEARTBEAT)
        assert not loading.done()  # gone has missed no heartbeat on the clock yet: it is waited for
        clock.advance(3 * HEARTBEAT + 0.001)  # now it has missed three
        await loading
        await until(lambda: live(catalog) == ["alive"])  # alive polls again; gone never does
        assert catalog.serving()
        alive.stop()

    run(scenario())


def test_unload_no_wait_refuses_while_a_replica_reports_requests_in_flight(catalog):
    async def scenario():
        replica = FakeReplica(catalog, "r0")
        replica.report.in_flight = {"gamma": 2}
        replica.report.held = {"gamma": catalog.state.entries["gamma"].adapter.version}
        await until(lambda: live(catalog) == ["r0"])
        with pytest.raises(AdapterBusy, match="2 request"):
            await catalog.unload("gamma", wait=False)
        assert "gamma" in catalog.state.entries
        version = catalog.state.entries["gamma"].adapter.version
        replica.report.in_flight = {}
        replica.report.served = {("gamma", version): 7}
        adapter, served = await catalog.unload("gamma")
        assert (adapter.name, served) == ("gamma", 7)
        with pytest.raises(AdapterNotFound, match="loaded adapters: alpha, beta"):
            await catalog.unload("gamma")
        listed = {s.adapter.name: s for s in await catalog.status()}
        assert sorted(listed) == ["alpha", "beta"]
        replica.stop()

    run(scenario())
