"""AdapterRegistry: which version of each adapter name serves new requests, and who still uses which.

Every request takes a lease on the version current when it arrives and keeps it to the end, so:
- `load` of a loaded name swaps the current version atomically: requests in flight finish on the
  old version, new ones get the new; the old version is unloaded from the engine when its last
  lease ends;
- `unload` removes the name at once for new requests and waits for the leases in flight (or
  refuses with AdapterBusy when asked not to wait).
Paths are confined to the adapter root (no `..`, no symlink out of it), names match
`[A-Za-z0-9._-]{1,64}` in full, and a path is checked (no NUL, bounded length) before the
filesystem sees it; every OS error on the way has its status (`_path_error`). A file's bytes must
match the sha256 recorded for it (`_verify_digest`), and a file that does not fit the graph is
refused before the engine sees it, so a bad Load leaves the server serving as before.

The registry lives on the asyncio loop (single-threaded); engine calls run in worker threads.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import stat
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
    AdapterFileUnusable,
    AdapterIncompatible,
    AdapterNotFound,
    InvalidRequest,
    LoraplexError,
    PermissionDenied,
    quoted,
)

log = logging.getLogger(__name__)

MAX_PATH_CHARS = 1024  # a Load path longer than this is refused before the filesystem sees it
MAX_NAME_BYTES = 255  # one path component (a file or directory name), as Linux allows
MAX_LISTED = 20  # loaded adapters a NOT_FOUND message names
DIGEST_SUFFIX = ".sha256"  # `<file>.sha256` beside an adapter file: its sha256 (sha256sum's format)
SHA256 = re.compile(r"[0-9a-f]{64}")


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
        names = self.names()
        loaded = ", ".join(names[:MAX_LISTED]) or "none"
        if len(names) > MAX_LISTED:
            loaded += f" and {len(names) - MAX_LISTED} more (Adapters.List has them all)"
        return AdapterNotFound(
            f"adapter {quoted(name)} is not loaded; loaded adapters: {loaded} (empty name = base model)"
        )

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
        path = str(path)
        if not path:
            raise InvalidRequest("path is empty: name an .onnx_adapter file under the server's adapter root")
        if "\0" in path:
            raise InvalidRequest(f"path {quoted(path)} contains a NUL character; no file name holds one")
        if len(path) > MAX_PATH_CHARS:
            raise InvalidRequest(f"path is {len(path)} characters; at most {MAX_PATH_CHARS} are accepted")
        long = next((part for part in path.split("/") if len(part.encode("utf-8")) > MAX_NAME_BYTES), None)
        if long is not None:
            raise InvalidRequest(
                f"path component {quoted(long, 40)} is {len(long.encode('utf-8'))} bytes; a file name holds at most "
                f"{MAX_NAME_BYTES}"
            )
        raw = Path(path)
        candidate = raw if raw.is_absolute() else self.adapter_root / raw
        # Not strict: symlinks resolve as far as they exist and nothing raises, so confinement is
        # decided first and a path outside the root never learns whether its target exists.
        real = Path(os.path.realpath(candidate))
        if not real.is_relative_to(self.adapter_root):
            raise PermissionDenied(
                f"path {quoted(path)} resolves outside the adapter root {self.adapter_root} (traversal or symlink); "
                "put the adapter file under the adapter root"
            )
        try:
            mode = os.stat(real).st_mode
        except OSError as exc:
            raise _path_error(path, exc) from None
        if not stat.S_ISREG(mode):
            raise AdapterFileNotFound(f"no adapter file at {quoted(path)} under the adapter root {self.adapter_root}")
        if real.suffix != ADAPTER_SUFFIX:
            raise InvalidRequest(
                f"{quoted(real.name)} is not an {ADAPTER_SUFFIX} file; write one with `loraplex adapters add`"
            )
        return real

    # -- internals ------------------------------------------------------------------------
    def _prepare(self, name: str, file: Path, version: str | None) -> tuple[AdapterVersion, AdapterWeights]:
        """Verify the file's bytes, check it against the graph, gather its metadata (worker thread)."""
        manifest = self._manifest()
        try:
            sha = file_sha256(file)
            self._verify_digest(file, sha, manifest)
            weights = read_adapter_file(file, self.package.lora_inputs)
            size = file.stat().st_size
        except AdapterFileError as exc:
            raise AdapterIncompatible(
                f"adapter {name!r} does not fit this package's graph: {exc}; "
                "re-export it for this package with `loraplex adapters add`"
            ) from exc
        except OSError as exc:
            raise _path_error(file.name, exc) from None
        entry = manifest.adapters.get(name) if manifest is not None else None
        entry = entry if entry is not None and entry.sha256 == sha else None
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
            size_bytes=size,
            accuracy=entry.accuracy if entry else None,
        )
        return found, weights

    def _manifest(self) -> Manifest | None:
        """The package manifest as it is on disk now: an adapter added to the package (`loraplex
        adapters add`) while serving is described there."""
        try:
            return Manifest.load(self.package.root)
        except (ManifestError, OSError):
            return None

    def _verify_digest(self, file: Path, sha: str, manifest: Manifest | None) -> None:
        """The file's sha256 must be the one recorded for it: in `<file>.sha256` beside it, else in the
        manifest entry whose file it is; a file with neither must be byte-identical to an adapter the
        manifest records (a copy of a package adapter). Flipped bytes never reach the parser."""
        entries: list[AdapterEntry] = list(manifest.adapters.values()) if manifest is not None else []
        sidecar = file.with_name(file.name + DIGEST_SUFFIX)
        if sidecar.is_file():
            expected, source = _read_digest(sidecar), sidecar.name
        else:
            own = next((e for e in entries if Path(os.path.realpath(self.package.root / e.file)) == file), None)
            if own is None:
                if any(e.sha256 == sha for e in entries):
                    return
                raise AdapterFileUnusable(
                    f"{file.name} has no recorded sha256: write it beside the file (`sha256sum {file.name} > "
                    f"{file.name}{DIGEST_SUFFIX}`) or add the adapter to the package with `loraplex adapters add`"
                )
            expected, source = own.sha256, f"the package manifest (adapter {own.name!r})"
        if sha != expected:
            raise AdapterFileUnusable(
                f"{file.name} does not match the sha256 recorded in {source} (its bytes hash to {sha[:16]}...): "
                "the file is corrupt or was changed after it was recorded; copy or export it again"
            )

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


def _read_digest(sidecar: Path) -> str:
    with open(sidecar, "rb") as f:
        words = f.read(4096).decode("ascii", "replace").split()
    digest = words[0].lower() if words else ""
    if not SHA256.fullmatch(digest):
        raise AdapterFileUnusable(
            f"{sidecar.name} does not start with a sha256 (64 hex digits): write it with sha256sum"
        )
    return digest


def _path_error(path: str, exc: OSError) -> LoraplexError:
    """The status of an OS error met while resolving or reading a Load path."""
    what = f"path {quoted(path)}"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return AdapterFileNotFound(f"no adapter file at {quoted(path)} under the adapter root")
    if exc.errno == errno.ELOOP:
        return InvalidRequest(f"{what} runs into a symlink loop; point it at a file")
    if exc.errno == errno.ENAMETOOLONG:
        return InvalidRequest(f"{what} is too long for the filesystem; use a shorter path")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return PermissionDenied(f"the server may not read {what}; fix the file's permissions")
    return AdapterFileUnusable(f"cannot read {what}: {exc.strerror or exc}")


def _projections(weights: AdapterWeights) -> list[str]:
    """The projections a file adapts (q_proj, ...), for a file the manifest does not describe."""
    return sorted({module.rsplit(".", 1)[-1] for module in weights.ranks})
