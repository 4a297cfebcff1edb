"""AdapterRegistry: which version of each adapter name serves new requests, and who still uses which.

Every request takes a lease on the version current when it arrives and keeps it to the end, so:
- `load` of a loaded name swaps the current version atomically: requests in flight finish on the
  old version, new ones get the new; the old version is unloaded from the engine when its last
  lease ends;
- `unload` removes the name at once for new requests and waits for the leases in flight (or
  refuses with AdapterBusy when asked not to wait).
Names, paths, file bytes (sha256) and the fit to the graph are checked by `AdapterFiles` before
the engine sees a file, so a bad Load leaves the server serving as before.

With adapter stores (`adapter_store`), a request naming an adapter that is not loaded resolves it
there (`lease`): the store's file is checked as a Load's is and loaded, then the request proceeds;
concurrent first requests for one name resolve it once, and a missing or bad entry fails only the
requests that named it.

The registry lives on the asyncio loop (single-threaded); engine calls run in worker threads.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from loraplex.adapters.package.manifest import Accuracy
from loraplex.adapters.package.output import OutputConstraint
from loraplex.adapters.package.reader import Package
from loraplex.adapters.package.template import PromptTemplate
from loraplex.runtime.engines.adapter_cache import HostCache, Residency
from loraplex.runtime.engines.base import AdapterHandle, Engine
from loraplex.runtime.errors import AdapterBusy, AdapterIncompatible, AdapterNotFound, quoted
from loraplex.runtime.server.adapter_files import AdapterFiles, CheckedAdapter
from loraplex.runtime.server.adapter_store import NAME, AdapterStores

log = logging.getLogger(__name__)

MAX_LISTED = 20  # loaded adapters a NOT_FOUND message names


@dataclass(eq=False)
class AdapterVersion:
    """One loaded version; `handle` is None for the base model."""

    name: str
    version: str
    handle: AdapterHandle | None
    rank: int = 0
    target_modules: list[str] = field(default_factory=list)
    template: PromptTemplate | None = None
    sha256: str = ""
    size_bytes: int = 0
    accuracy: Accuracy | None = None  # as export verified it
    output: OutputConstraint | None = None  # the default output contract of its requests
    leases: int = 0
    served: int = 0
    retired: bool = False
    unloaded: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    def of(cls, checked: CheckedAdapter, handle: AdapterHandle | None) -> AdapterVersion:
        return cls(checked.name, checked.version, handle, checked.rank, list(checked.target_modules),
                   checked.template, checked.sha256, checked.size_bytes, checked.accuracy, checked.output)


class Lease:
    """A request's hold on one adapter version; `release` exactly once (context manager or call)."""

    def __init__(self, registry: AdapterRegistry, version: AdapterVersion):
        self._registry = registry
        self.version = version
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._registry._release(self.version)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


BASE_NAME = ""


def adapter_cache(engine: Engine) -> HostCache | None:
    """The host tier of an engine's adapters (both engines have one), through a test's proxy too."""
    return getattr(getattr(engine, "executor", None), "cache", None)


def residency(engine: Engine, version: AdapterVersion) -> Residency | None:
    """Where a loaded version's weights are (None: the base model, or an engine without a cache)."""
    cache = adapter_cache(engine)
    return None if cache is None or version.handle is None else cache.residency(version.handle)


class AdapterRegistry:
    def __init__(self, engine: Engine, package: Package, adapter_root: Path, stores: AdapterStores | None = None,
                 pinned: set[str] | frozenset[str] = frozenset()):
        self.engine = engine
        self.package = package
        self.files = AdapterFiles(package, adapter_root)
        self.adapter_root = self.files.adapter_root
        self.stores = stores or AdapterStores([])
        self.pinned = set(pinned)  # names whose versions the engine never evicts from host memory
        if (cache := adapter_cache(engine)) is not None:
            cache.pinned_names = self.pinned  # one set: a version is pinned from its load on
        self._current: dict[str, AdapterVersion] = {BASE_NAME: AdapterVersion(BASE_NAME, "base", None)}
        self._admin = asyncio.Lock()
        self._unloading: set[asyncio.Task] = set()
        self._resolving: dict[str, asyncio.Task] = {}
        self.resolved = 0  # adapters loaded from a store on first use

    # -- requests -------------------------------------------------------------------------
    def acquire(self, name: str) -> Lease:
        version = self._current.get(name)
        if version is None:
            raise self._not_found(name)
        version.leases += 1
        version.served += 1
        return Lease(self, version)

    async def lease(self, name: str) -> Lease:
        """`acquire`, first resolving a name that is not loaded in the adapter stores (if any)."""
        if name not in self._current:
            await self.ensure(name)
        return self.acquire(name)

    async def ensure(self, name: str) -> AdapterVersion:
        """The current version of `name`, resolved in the adapter stores if it is not loaded."""
        if name not in self._current and self.may_resolve(name):
            task = self._resolving.get(name)
            if task is None:
                task = asyncio.get_running_loop().create_task(self._resolve(name))
                self._resolving[name] = task
                task.add_done_callback(self._resolved)
            await asyncio.shield(task)
        return self.get(name)

    def may_resolve(self, name: str) -> bool:
        """Whether a request for `name`, not loaded, would be looked up in the stores."""
        return bool(self.stores) and bool(NAME.fullmatch(name))

    def _resolved(self, task: asyncio.Task) -> None:
        self._resolving = {n: t for n, t in self._resolving.items() if t is not task}
        if not task.cancelled():
            task.exception()  # retrieved: its requests got it (or went away before it came)

    async def _resolve(self, name: str) -> None:
        stored = await asyncio.to_thread(self.stores.fetch, name)
        base = self.package.manifest.base.sha256
        if stored.base_sha256 and base and stored.base_sha256 != base:
            raise AdapterIncompatible(
                f"adapter {quoted(name)} in {stored.source} was made for another base model (sha256 "
                f"{stored.base_sha256[:16]}..., this server's is {base[:16]}...)"
            )
        await self.load_file(name, stored.file, stored.version, stored.template, stored.output,
                             recorded=stored.sha256, only_new=True)
        self.resolved += 1
        log.info("adapter %s resolved from %s", name, stored.source)

    def _release(self, version: AdapterVersion) -> None:
        version.leases -= 1
        if version.retired and version.leases == 0:
            self.schedule_unload(version)

    def names(self) -> list[str]:
        return sorted(n for n in self._current if n)

    def versions(self) -> list[AdapterVersion]:
        return [self._current[n] for n in self.names()]

    def get(self, name: str) -> AdapterVersion:
        if name not in self._current or not name:
            raise self._not_found(name)
        return self._current[name]

    def _not_found(self, name: str) -> AdapterNotFound:
        names = self.names()
        loaded = ", ".join(names[:MAX_LISTED]) or "none"
        if len(names) > MAX_LISTED:
            loaded += f" and {len(names) - MAX_LISTED} more (Adapters.List has them all)"
        return AdapterNotFound(
            f"adapter {quoted(name)} is not loaded; loaded adapters: {loaded} (empty name = base model)"
        )

    # -- admin ----------------------------------------------------------------------------
    async def load(self, name: str, path: str | Path, version: str | None = None, pin: bool = False
                   ) -> AdapterVersion:
        """Load (or replace) `name` from a file under the adapter root; `pin`: never evict its versions."""
        self.files.check_name(name)
        return await self.load_file(name, self.resolve(path), version, pin=pin)

    async def load_file(self, name: str, file: Path, version: str | None = None,
                        template: PromptTemplate | None = None,
                        output: OutputConstraint | None = None, *, recorded: str | None = None,
                        only_new: bool = False, pin: bool = False) -> AdapterVersion:
        """Load (or replace) `name` from a file already resolved and trusted (the package's own).

        `template` and `output` (the default output contract) serve when the manifest does not describe
        the file (default: those of the version it replaces, so a replacement keeps serving the same task).
        `recorded`: the sha256 a store records for the file. `only_new`: keep a version loaded meanwhile.
        `pin`: the name's versions stay in host memory (as `--pin`).
        """
        async with self._admin:
            current = self._current.get(name)
            if only_new and current is not None:
                return current
            fallback = template if template is not None else (current.template if current else None)
            contract = output if output is not None else (current.output if current else None)
            with self.engine.quiet():  # reading the file needs the GIL, which some engines' steps hold
                checked, weights = await asyncio.to_thread(self.files.read, name, file, version, fallback, contract,
                                                           recorded)
                if pin:
                    self.pinned.add(name)
                handle = await asyncio.to_thread(self.engine.load_adapter, name, checked.version, weights)
            if (cache := adapter_cache(self.engine)) is not None:
                cache.record_sha256(handle, checked.sha256, checked.fingerprint)
            new = AdapterVersion.of(checked, handle)
            old = self._current.get(name)
            self._current[name] = new
            if old is not None:
                old.retired = True
                if old.leases == 0:
                    self.schedule_unload(old)
        log.info("adapter %s version %s loaded from %s (replaced: %s)", name, new.version, file, old and old.version)
        return new

    async def unload(self, name: str, wait: bool = True) -> AdapterVersion:
        """Remove `name` for new requests; wait for its requests in flight, then free it."""
        async with self._admin:
            version = self.get(name)
            if version.leases and not wait:
                raise AdapterBusy(
                    f"adapter {name!r} has {version.leases} request(s) in flight; unload with waiting, or retry later"
                )
            self.retire(name)
        await version.unloaded.wait()
        log.info("adapter %s version %s unloaded after %d request(s)", name, version.version, version.served)
        return version

    def retire(self, name: str) -> AdapterVersion:
        """Remove `name` for new requests at once; its version is freed after its last request
        (await `.unloaded`). The caller serializes it with loads of the same name."""
        version = self.get(name)
        del self._current[name]
        version.retired = True
        if version.leases == 0:
            self.schedule_unload(version)
        return version

    async def close(self) -> None:
        """Wait for pending engine unloads (at shutdown)."""
        if self._unloading:
            await asyncio.gather(*self._unloading, return_exceptions=True)

    def resolve(self, path: str | Path) -> Path:
        """The real file a Load path names, refusing anything outside the adapter root."""
        return self.files.resolve(path)

    def schedule_unload(self, version: AdapterVersion) -> None:
        """Unload `version` from the engine off the event loop (call it once no request holds the
        version); `version.unloaded` is set when that is done."""
        if version.handle is None:
            version.unloaded.set()
            return

        async def unload() -> None:
            try:
                await asyncio.to_thread(self.engine.unload_adapter, version.handle)
            except Exception:
                log.exception("unloading adapter %s version %s failed", version.name, version.version)
            finally:
                version.unloaded.set()

        task = asyncio.get_running_loop().create_task(unload())
        self._unloading.add(task)
        task.add_done_callback(self._unloading.discard)

