"""Adapter stores: where an adapter named in a request, and not loaded, is found on first use.

A store is an `AdapterSource`: it lists the adapter names it holds and hands over one adapter as a
local file (`fetch`). The registry checks what a store hands over exactly as it checks an
`Adapters.Load` (`AdapterFiles.read`: sha256, fit to the graph, finite values), plus the base model
the store says the adapter was made for, before any request runs on it.

`DirectoryStore` is the one built in (`--adapter-store DIR`): `DIR/<name>.onnx_adapter`, its sha256
in `<file>.sha256` beside it (as for a Load), or, when DIR is a package's `adapters/` directory, in
that package's manifest (whose base model must then be this server's). Another kind of store (object
storage, a model registry) implements `AdapterSource`: `fetch` downloads into a local directory of
its own and returns the file with the digest the store records for it; the registry does the rest.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from loraplex.adapters.package.adapter_file import ADAPTER_SUFFIX
from loraplex.adapters.package.manifest import Manifest, ManifestError
from loraplex.adapters.package.output import OutputConstraint
from loraplex.adapters.package.template import PromptTemplate
from loraplex.runtime.errors import AdapterFileUnusable, AdapterNotFound, quoted

NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class StoredAdapter:
    """One adapter as a store hands it over: a local file and what the store records about it."""

    name: str
    file: Path  # a regular file this process can read
    source: str  # the store it came from (for messages and logs)
    sha256: str | None = None  # the digest the store records; None: `<file>.sha256` or the manifest decides
    base_sha256: str | None = None  # the base model the adapter was made for, when the store records it
    version: str | None = None
    template: PromptTemplate | None = None
    output: OutputConstraint | None = None


@runtime_checkable
class AdapterSource(Protocol):
    """Where adapters come from. Both methods block (the registry calls them in a worker thread)."""

    description: str  # e.g. "directory /srv/adapters"

    def names(self) -> list[str]:
        """The adapter names this store holds (sorted)."""

    def fetch(self, name: str) -> StoredAdapter | None:
        """`name` as a local file, or None when this store does not hold it. Raise a `LoraplexError`
        for an entry that exists but cannot be handed over."""


class DirectoryStore:
    """`root/<name>.onnx_adapter` files; a symlink must stay under `root`."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise ValueError(f"adapter store {root} is not a directory")
        self.description = f"directory {self.root}"
        self._manifest = _package_manifest(self.root)

    def names(self) -> list[str]:
        return sorted(p.name[: -len(ADAPTER_SUFFIX)] for p in self.root.glob(f"*{ADAPTER_SUFFIX}")
                      if NAME.fullmatch(p.name[: -len(ADAPTER_SUFFIX)]))

    def fetch(self, name: str) -> StoredAdapter | None:
        if not NAME.fullmatch(name):
            return None
        file = self.root / f"{name}{ADAPTER_SUFFIX}"
        entry = self._manifest.adapters.get(name) if self._manifest is not None else None
        if entry is not None:
            file = self.root.parent / entry.file
        real = Path(os.path.realpath(file))
        if not real.is_relative_to(self.root):
            raise AdapterFileUnusable(f"adapter {quoted(name)} in the store {self.root} links outside it")
        if not real.is_file():
            return None
        base = self._manifest.base.sha256 if self._manifest is not None else None
        if entry is None:
            return StoredAdapter(name, real, self.description, base_sha256=base)
        return StoredAdapter(name, real, self.description, sha256=entry.sha256, base_sha256=base,
                             version=entry.version,
                             template=PromptTemplate.from_dict(entry.template) if entry.template else None,
                             output=entry.output_constraint() if entry.output else None)


class AdapterStores:
    """Stores asked in order; the first that holds a name serves it."""

    def __init__(self, sources: list[AdapterSource]):
        self.sources = list(sources)

    def __bool__(self) -> bool:
        return bool(self.sources)

    def names(self) -> list[str]:
        return sorted({name for source in self.sources for name in source.names()})

    def fetch(self, name: str) -> StoredAdapter:
        for source in self.sources:
            found = source.fetch(name)
            if found is not None:
                return found
        where = "; ".join(source.description for source in self.sources)
        raise AdapterNotFound(f"adapter {quoted(name)} is not loaded and no adapter store holds it (stores: {where})")


def _package_manifest(root: Path) -> Manifest | None:
    """The manifest of the package whose adapters directory `root` is, if it is one."""
    if not (root.parent / MANIFEST).is_file():
        return None
    try:
        return Manifest.load(root.parent)
    except (ManifestError, OSError, ValueError):
        return None
