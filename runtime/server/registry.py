"""AdapterRegistry: which version of each adapter name serves new requests, and who still uses which.

Every request takes a lease on the version current when it arrives and keeps it to the end, so:
- `load` of a loaded name swaps the current version atomically: requests in flight finish on the
  old version, new ones get the new; the old version is unloaded from the engine when its last
  lease ends;
- `unload` removes the name at once for new requests and waits for the leases in flight (or
  refuses with AdapterBusy when asked not to wait).
Paths are confined to the adapter root (no `..`, no symlink out of it), names match
`[A-Za-z0-9._-]{1,64}`, and a file that does not fit the graph is refused before the engine sees
it, so a bad Load leaves the server serving as before.

The registry lives on the asyncio loop (single-threaded); engine calls run in worker threads.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from loraplex.adapters.package.adapter_file import ADAPTER_SUFFIX, AdapterFileError, AdapterWeights, read_adapter_file
from loraplex.adapters.package.manifest import (
    Accuracy,
    AdapterEntry,
    Manifest,
    ManifestError,
    check_adapter_name,
    file_sha256,
)
from loraplex.adapters.package.reader import Package
from loraplex.adapters.package.template import PromptTemplate
from loraplex.runtime.engines.base import AdapterHandle, Engine
from loraplex.runtime.errors import (
    AdapterBusy,
    AdapterFileNotFound,
    AdapterIncompatible,
    AdapterNotFound,
    InvalidRequest,
    PermissionDenied,
)

log = logging.getLogger(__name__)


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
    accuracy: Accuracy | None = None  # as export verified it (the manifest entry of this exact file)
    leases: int = 0
    served: int = 0
    retired: bool = False
    unloaded: asyncio.Event = field(default_factory=asyncio.Event)


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


class AdapterRegistry:
    def __init__(self, engine: Engine, package: Package, adapter_root: Path):
        self.engine = engine
        self.package = package
        self.adapter_root = Path(adapter_root).resolve()
        self._current: dict[str, AdapterVersion] = {BASE_NAME: AdapterVersion(BASE_NAME, "base", None)}
        self._admin = asyncio.Lock()
        self._unloading: set[asyncio.Task] = set()

    # -- requests -------------------------------------------------------------------------
    def acquire(self, name: str) -> Lease:
        version = self._current.get(name)
        if version is None:
            raise self._not_found(name)
        version.leases += 1
        version.served += 1
        return Lease(self, version)

    def _release(self, version: AdapterVersion) -> None:
        version.leases -= 1
        if version.retired and version.leases == 0:
            self._schedule_unload(version)

    def names(self) -> list[str]:
        return sorted(n for n in self._current if n)

    def versions(self) -> list[AdapterVersion]:
        return [self._current[n] for n in self.names()]

    def get(self, name: str) -> AdapterVersion:
        if name not in self._current or not name:
            raise self._not_found(name)
        return self._current[name]

    def _not_found(self, name: str) -> AdapterNotFound:
        loaded = ", ".join(self.names()) or "none"
        return AdapterNotFound(f"adapter {name!r} is not loaded; loaded adapters: {loaded} (empty name = base model)")

    # -- admin ----------------------------------------------------------------------------
    async def load(self, name: str, path: str | Path, version: str | None = None) -> AdapterVersion:
        """Load (or replace) `name` from a file under the adapter root."""
        try:
            check_adapter_name(name)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from exc
        return await self.load_file(name, self.resolve(path), version)

    async def load_file(self, name: str, file: Path, version: str | None = None) -> AdapterVersion:
        """Load (or replace) `name` from a file already resolved and trusted (the package's own)."""
        async with self._admin:
            new, weights = await asyncio.to_thread(self._prepare, name, file, version)
            new.handle = await asyncio.to_thread(self.engine.load_adapter, name, new.version, weights)
            old = self._current.get(name)
            self._current[name] = new
            if old is not None:
                old.retired = True
                if old.leases == 0:
                    self._schedule_unload(old)
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
            del self._current[name]
            version.retired = True
            if version.leases == 0:
                self._schedule_unload(version)
        await version.unloaded.wait()
        log.info("adapter %s version %s unloaded after %d request(s)", name, version.version, version.served)
        return version

    async def close(self) -> None:
        """Wait for pending engine unloads (at shutdown)."""
        if self._unloading:
            await asyncio.gather(*self._unloading, return_exceptions=True)

    def resolve(self, path: str | Path) -> Path:
        """The real file a Load path names, refusing anything outside the adapter root."""
        raw = Path(path)
        if not str(path):
            raise InvalidRequest("path is empty: name an .onnx_adapter file under the server's adapter root")
        candidate = raw if raw.is_absolute() else self.adapter_root / raw
        real = candidate.resolve()
        if not real.is_relative_to(self.adapter_root):
            raise PermissionDenied(
                f"path {str(path)!r} resolves outside the adapter root {self.adapter_root} (traversal or symlink); "
                "put the adapter file under the adapter root"
            )
        if not real.is_file():
            raise AdapterFileNotFound(f"no adapter file at {str(path)!r} under the adapter root {self.adapter_root}")
        if real.suffix != ADAPTER_SUFFIX:
            raise InvalidRequest(f"{real.name} is not an {ADAPTER_SUFFIX} file; write one with `loraplex adapters add`")
        return real

    # -- internals ------------------------------------------------------------------------
    def _prepare(self, name: str, file: Path, version: str | None) -> tuple[AdapterVersion, AdapterWeights]:
        """Check the file against the graph and gather its metadata (worker thread)."""
        try:
            weights = read_adapter_file(file, self.package.lora_inputs)
        except AdapterFileError as exc:
            raise AdapterIncompatible(
                f"adapter {name!r} does not fit this package's graph: {exc}; "
                "re-export it for this package with `loraplex adapters add`"
            ) from exc
        sha = file_sha256(file)
        entry = self._manifest_entry(name, sha)
        current = self._current.get(name)
        template = None
        if entry is not None and entry.template:
            template = PromptTemplate.from_dict(entry.template)
        elif current is not None:
            template = current.template  # a replacement keeps serving the same task
        found = AdapterVersion(
            name=name,
            version=version or (entry.version if entry else sha[:12]),
            handle=None,
            rank=entry.rank if entry else weights.rank,
            target_modules=list(entry.target_modules) if entry else _projections(weights),
            template=template,
            sha256=sha,
            size_bytes=file.stat().st_size,
            accuracy=entry.accuracy if entry else None,
        )
        return found, weights

    def _manifest_entry(self, name: str, sha: str) -> AdapterEntry | None:
        """The manifest's entry for this exact file, if the package describes it. Read from disk: an
        adapter added to the package (`loraplex adapters add`) while serving is described there."""
        try:
            manifest = Manifest.load(self.package.root)
        except ManifestError:
            return None
        entry = manifest.adapters.get(name)
        return entry if entry is not None and entry.sha256 == sha else None

    def _schedule_unload(self, version: AdapterVersion) -> None:
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


def _projections(weights: AdapterWeights) -> list[str]:
    """The projections a file adapts (q_proj, ...), for a file the manifest does not describe."""
    return sorted({module.rsplit(".", 1)[-1] for module in weights.ranks})
