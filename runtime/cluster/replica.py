"""EngineReplica: one loraplex engine behind Ray Serve, no port of its own.

Each replica builds what `start_server` builds (`build_core`: package, engine, adapter registry,
request path; the base model warmed up) and answers the Generation calls the front end forwards
through the same `GenerationServicer`, so requests, validation, errors and outputs are the single
server's. Adapters are not loaded at start: a request for an adapter goes through Serve's
multiplexing (`@serve.multiplexed`, at most `slots` adapters per replica, least recently used
evicted), which loads it here from the catalog's entry (`ReplicaAdapters`) and tells Serve's
routers that this replica holds it.

A background task follows the catalog (`AdapterCatalog.watch`), applies its changes and reports
this replica's adapters, usage and, when asked, its Prometheus metrics. Serve's health check
fails when the engine's thread died (Serve then replaces the replica); Serve's graceful shutdown
drains the requests in flight before `__del__` closes the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

from loraplex.adapters.package.reader import Package
from loraplex.runtime.cluster.catalog import CatalogUpdate, ReplicaReport
from loraplex.runtime.cluster.residency import ReplicaAdapters
from loraplex.runtime.errors import LoraplexError
from loraplex.runtime.server import ServerConfig
from loraplex.runtime.server.app import build_core, generation_servicer
from loraplex.runtime.server.metrics import ServerMetrics
from loraplex.v1 import generation_pb2
from prometheus_client import Counter, generate_latest
from ray import serve
from ray.serve.handle import DeploymentHandle

log = logging.getLogger(__name__)


class ResidentAdapter:
    """What Serve's multiplexer caches per adapter; when it evicts one, the replica retires it.

    Serve calls `__del__` from a worker thread at eviction (and Python again at garbage
    collection): hop to the loop, once.
    """

    def __init__(self, name: str, adapters: ReplicaAdapters, loop: asyncio.AbstractEventLoop):
        self.name, self._adapters, self._loop = name, adapters, loop
        self._evicted = False

    def __del__(self) -> None:
        if self._evicted:
            return
        self._evicted = True
        with contextlib.suppress(RuntimeError):  # RuntimeError: the loop is closed, the replica is gone
            self._loop.call_soon_threadsafe(self._adapters.evict, self.name)


class EngineReplica:
    async def __init__(self, config: ServerConfig, catalog: DeploymentHandle, slots: int):
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.catalog = catalog
        self._loop = asyncio.get_running_loop()
        package = await asyncio.to_thread(Package.open, config.package)
        self.metrics = ServerMetrics()
        self.affinity = Counter(
            "loraplex_adapter_affinity",
            "Adapter requests by whether this replica already held the adapter (hit) or had to load it (load)",
            ["adapter", "outcome"], registry=self.metrics.registry,
        )
        self.core = await build_core(dataclasses.replace(config, load_package_adapters=False), package, self.metrics)
        self.generation = generation_servicer(config, package)
        self.generation.service = self.core.service
        first: CatalogUpdate = await self.catalog.watch.remote(ReplicaReport(self.replica), 0.0)
        self.adapters = ReplicaAdapters(self.core.registry, first.state)
        self._applied = first.state.generation  # nothing held yet: the first state applies at once
        self._completion: asyncio.Task | None = None
        self._answered = 0  # the catalog's last report round this replica answered
        self._metrics_sent = 0  # ... and the last one it sent its metrics in
        self._report_now = asyncio.Event()
        self._closed = False

        async def resident(name: str) -> ResidentAdapter:
            await self.adapters.ensure(name)
            return ResidentAdapter(name, self.adapters, self._loop)

        self._resident = serve.multiplexed(max_num_models_per_replica=slots)(resident)
        self._follow = self._loop.create_task(self._follow_catalog(first))
        log.info("replica %s serving %s (engine %s, %d adapter slots)", self.replica, package.root, config.engine,
                 slots)

    # -- the Generation calls, as the front end forwards them ------------------------------
    # A client's error (unknown adapter, bad parameter, full queue...) is an answer, not a fault of
    # this replica: it is returned (a stream: yielded last) for the front end to raise, so Serve
    # neither logs it as a failed request nor counts it against the replica.
    async def Generate(self, request: generation_pb2.GenerateRequest):
        return await self._unary(self.generation.Generate, request)

    async def GenerateStream(self, request: generation_pb2.GenerateRequest) -> AsyncIterator[Any]:
        try:
            await self._hold(request.adapter)
            async for chunk in self.generation.GenerateStream(request, None):
                yield chunk
        except LoraplexError as exc:
            yield exc

    async def Tokenize(self, request: generation_pb2.TokenizeRequest):
        return await self._unary(self.generation.Tokenize, request)

    async def Classify(self, request: generation_pb2.ClassifyRequest):
        return await self._unary(self.generation.Classify, request)

    async def _unary(self, call, request):
        """`call(request)` once this replica holds the request's adapter; a client's error is returned."""
        try:
            await self._hold(request.adapter)
            return await call(request, None)
        except LoraplexError as exc:
            return exc

    async def ModelInfo(self, request: generation_pb2.ModelInfoRequest):
        try:
            info = await self.generation.ModelInfo(request, None)
        except LoraplexError as exc:
            return exc
        del info.adapters[:]
        info.adapters.extend(self.adapters.state.names())  # the cluster's adapters, not only the ones held here
        return info

    async def _hold(self, adapter: str) -> None:
        """Make sure this replica holds `adapter`'s current version (base model: nothing to do)."""
        if not adapter:
            return
        self.adapters.entry(adapter)  # NOT_FOUND before the multiplexer, which would evict to make room
        held = self.adapters.holds(adapter)
        await self._resident(adapter)  # Serve's LRU of `slots` adapters; loads through `resident`
        await self.adapters.ensure(adapter)  # a newer version, or re-added after an unload
        self.affinity.labels(adapter, "hit" if held else "load").inc()

    # -- following the catalog --------------------------------------------------------------
    async def _follow_catalog(self, update: CatalogUpdate) -> None:
        while True:
            try:
                state = update.state
                if state.catalog_id != self.adapters.state.catalog_id:  # the catalog restarted: new numbering
                    self._applied, self._completion = -1, None
                if (state.catalog_id, state.generation) != (self.adapters.state.catalog_id,
                                                             self.adapters.state.generation):
                    self._complete(state.generation, await self.adapters.apply(state))
                metrics = ""
                if update.metrics_round > self._metrics_sent:
                    self._metrics_sent = update.round
                    metrics = generate_latest(self.metrics.registry).decode()
                self._answered = max(self._answered, update.round)
                report = self.adapters.report(self.replica, applied=self._applied, answered=self._answered,
                                              metrics=metrics, serving=not self._closed)
                report.pid, report.node = os.getpid(), socket.gethostname()
                update = await self._watch(report)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("replica %s: following the adapter catalog failed; retrying", self.replica,
                            exc_info=True)
                await asyncio.sleep(1.0)

    async def _watch(self, report: ReplicaReport) -> CatalogUpdate:
        """One long poll; cut short when a drain completes, so the catalog hears of it at once."""
        self._report_now.clear()
        response = self.catalog.watch.remote(report)
        poll = asyncio.ensure_future(response)
        poll.add_done_callback(lambda f: f.cancelled() or f.exception())  # a cut-short poll's error is expected
        nudge = asyncio.ensure_future(self._report_now.wait())
        try:
            await asyncio.wait({poll, nudge}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            nudge.cancel()
        if poll.done():
            return poll.result()
        poll.cancel()
        response.cancel()
        return CatalogUpdate(self.adapters.state, self._answered, 0)

    def _complete(self, generation: int, drained: list[asyncio.Event]) -> None:
        """Report `generation` applied once its retired versions drained (in order of generations)."""
        previous = self._completion

        async def complete() -> None:
            if previous is not None:
                await previous
            await asyncio.gather(*(event.wait() for event in drained))
            self._applied = max(self._applied, generation)
            if drained:
                self._report_now.set()

        self._completion = self._loop.create_task(complete())

    # -- Serve's hooks ------------------------------------------------------------------------
    async def check_health(self) -> None:
        if not self.core.engine.healthy():
            raise RuntimeError(f"replica {self.replica}: the {self.core.engine.name} engine's thread has stopped")
        if self._follow.done():
            raise RuntimeError(f"replica {self.replica}: it stopped following the adapter catalog")

    def __del__(self) -> None:
        """Serve calls this after draining the requests in flight (and Python may, again, at exit)."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self.adapters.closed = True
        self._follow.cancel()
        try:
            self.catalog.leave.remote(self.replica)
        except Exception:  # the catalog may be gone first at application shutdown
            log.debug("replica %s: could not tell the catalog it leaves", self.replica, exc_info=True)
        self.core.engine.close()
