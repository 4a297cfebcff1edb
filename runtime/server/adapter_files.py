"""AdapterFiles: which files an `Adapters.Load` may name, and what a checked file is.

Everything a Load decides before an engine sees the file: the name matches
`[A-Za-z0-9._-]{1,64}`, the path resolves under the adapter root (no `..`, no symlink out of it),
the file fits the package's graph (`read_adapter_file`), and its metadata (version, template,
rank) comes from the package manifest when the manifest describes this exact file (sha256).

The registry uses it on every Load; the cluster's adapter catalog uses it to check a Load once
for all replicas, with no engine at hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from loraplex.adapters.package.adapter_file import ADAPTER_SUFFIX, AdapterFileError, AdapterWeights, read_adapter_file
from loraplex.adapters.package.manifest import AdapterEntry, Manifest, ManifestError, check_adapter_name, file_sha256
from loraplex.adapters.package.reader import Package
from loraplex.adapters.package.template import PromptTemplate
from loraplex.runtime.errors import AdapterFileNotFound, AdapterIncompatible, InvalidRequest, PermissionDenied


@dataclass(frozen=True)
class CheckedAdapter:
    """An adapter file that fits the graph, and what it is: the facts a Load records."""

    name: str
    version: str
    file: Path
    rank: int
    target_modules: list[str] = field(default_factory=list)
    template: PromptTemplate | None = None
    sha256: str = ""
    size_bytes: int = 0


class AdapterFiles:
    def __init__(self, package: Package, adapter_root: Path):
        self.package = package
        self.adapter_root = Path(adapter_root).resolve()

    @staticmethod
    def check_name(name: str) -> str:
        try:
            return check_adapter_name(name)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from exc

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

    def read(self, name: str, file: Path, version: str | None = None,
             template: PromptTemplate | None = None) -> tuple[CheckedAdapter, AdapterWeights]:
        """Check `file` against the graph and describe it (blocking: reads and hashes the file).

        The version is `version`, else the manifest's for this file, else the file's sha256 prefix;
        the template is the manifest's for this file, else `template` (a replacement keeps serving
        the task of the version it replaces).
        """
        try:
            weights = read_adapter_file(file, self.package.lora_inputs)
        except AdapterFileError as exc:
            raise AdapterIncompatible(
                f"adapter {name!r} does not fit this package's graph: {exc}; "
                "re-export it for this package with `loraplex adapters add`"
            ) from exc
        sha = file_sha256(file)
        entry = self._manifest_entry(name, sha)
        if entry is not None and entry.template:
            template = PromptTemplate.from_dict(entry.template)
        found = CheckedAdapter(
            name=name,
            version=version or (entry.version if entry else sha[:12]),
            file=file,
            rank=entry.rank if entry else weights.rank,
            target_modules=list(entry.target_modules) if entry else _projections(weights),
            template=template,
            sha256=sha,
            size_bytes=file.stat().st_size,
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


def _projections(weights: AdapterWeights) -> list[str]:
    """The projections a file adapts (q_proj, ...), for a file the manifest does not describe."""
    return sorted({module.rsplit(".", 1)[-1] for module in weights.ranks})
