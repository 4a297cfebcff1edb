"""ReplicaAdapters: the adapters one engine replica holds, following the cluster's catalog.

A replica loads an adapter when a request for it arrives (Serve's multiplexing routes requests
to replicas that already hold their adapter, see `routing`), from the catalog's entry for the
name, into its own `AdapterRegistry`: the single server's leases, atomic replace and deferred
unload apply unchanged. When the catalog changes, `apply` brings the held adapters in line:
a new version of a held name is loaded and swapped in (requests in flight finish on the old
one), a removed name is retired (new requests get NOT_FOUND, those in flight finish). An
adapter Serve's multiplexer evicts (LRU beyond the replica's slots) is retired the same way.

A replica never serves a version the catalog has replaced: if the new file fails to load here,
the name is dropped on this replica and each request for it retries the load (and reports why).
All loads and retirements go through one lock, so the registry never sees two for one name at
once; waiting for requests in flight happens outside it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

from loraplex.runtime.cluster.catalog import CatalogEntry, CatalogState, ReplicaReport
from loraplex.runtime.errors import AdapterNotFound, LoraplexError
from loraplex.runtime.server.registry import AdapterRegistry

log = logging.getLogger(__name__)


class ReplicaAdapters:
    def __init__(self, registry: AdapterRegistry, state: CatalogState):
        self.registry = registry
        self.state = state
        self._loaded: dict[str, int] = {}  # name -> catalog serial held
        self._failed: dict[str, str] = {}
        self._retired_served: Counter[tuple[str, str]] = Counter()
        self._lock = asyncio.Lock()
        self._evictions: set[asyncio.Task] = set()
        self.closed = False  # the replica is stopping: evictions no longer matter

    def entry(self, name: str) -> CatalogEntry:
        """The catalog's entry for `name` (NOT_FOUND naming the cluster's adapters)."""
        entry = self.state.entries.get(name)
        if entry is None:
            raise self.state.not_found(name)
        return entry

    def holds(self, name: str) -> bool:
        """True if this replica holds the catalog's current version of `name`."""
        entry = self.state.entries.get(name)
        return entry is not None and self._loaded.get(name) == entry.serial

    async def ensure(self, name: str) -> None:
        """Hold the catalog's current version of `name` (load or replace it here if needed)."""
        if self.holds(name):
            return
        async with self._lock:
            entry = self.entry(name)  # the catalog may have moved on while this waited
            if self._loaded.get(name) != entry.serial:
                await self._load(entry)

    async def apply(self, state: CatalogState) -> list[asyncio.Event]:
        """Follow a new catalog state: reload replaced adapters, retire removed ones.

        Returns once new requests see the new state; the returned events are set when the requests
        still in flight on retired versions have finished.
        """
        self.state = state
        retired = []
        async with self._lock:
            for name, serial in list(self._loaded.items()):
                entry = state.entries.get(name)
                if entry is None:
                    retired.append(self._retire(name))
                elif entry.serial != serial:
                    try:
                        await self._load(entry)
                    except LoraplexError as exc:
                        log.error("adapter %s version %s failed to load on this replica: %s", name,
                                  entry.adapter.version, exc)
        return [version.unloaded for version in retired if version is not None]

    def evict(self, name: str) -> None:
        """Serve's multiplexer dropped `name` from this replica (LRU): retire it (on the loop)."""
        if self.closed:
            return
        task = asyncio.get_running_loop().create_task(self._evict(name))
        self._evictions.add(task)
        task.add_done_callback(self._evictions.discard)

    def report(self, replica: str, *, applied: int, answered: int, metrics: str = "",
               serving: bool = True) -> ReplicaReport:
        served = Counter(self._retired_served)
        in_flight, held = {}, {}
        for version in self.registry.versions():
            held[version.name] = version.version
            in_flight[version.name] = version.leases
            served[(version.name, version.version)] += version.served
        return ReplicaReport(replica=replica, catalog_id=self.state.catalog_id, seen=self.state.generation,
                             applied=applied, answered=answered, serving=serving, held=held, in_flight=in_flight,
                             served=dict(served), failed=dict(self._failed), metrics=metrics)

    # -- internals (under the lock) ---------------------------------------------------------
    async def _load(self, entry: CatalogEntry) -> None:
        adapter = entry.adapter
        try:
            await self.registry.load_file(adapter.name, adapter.file, adapter.version, adapter.template,
                                          adapter.output)
        except LoraplexError as exc:
            self._failed[adapter.name] = str(exc)
            self._retire(adapter.name)  # never serve the version the catalog replaced
            raise
        self._failed.pop(adapter.name, None)
        self._loaded[adapter.name] = entry.serial

    def _retire(self, name: str):
        """Drop `name` here now; returns the retired version (await its `.unloaded`) or None."""
        self._loaded.pop(name, None)
        try:
            version = self.registry.retire(name)
        except AdapterNotFound:
            return None
        self._retired_served[(name, version.version)] += version.served
        return version

    async def _evict(self, name: str) -> None:
        async with self._lock:
            if name in self._loaded:
                self._retire(name)
                log.info("adapter %s evicted from this replica (least recently used)", name)
