"""AdapterFiles: which files an `Adapters.Load` may name, and what a checked file is.

Everything a Load decides before an engine sees the file:
- the name matches `[A-Za-z0-9._-]{1,64}` in full;
- the path is checked (no NUL, bounded length) before the filesystem sees it, then resolves under
  the adapter root (no `..`, no symlink out of it); every OS error on the way has its status
  (`_path_error`);
- the file's bytes match the sha256 recorded for it (`_verify_digest`), then it fits the package's
  graph (`read_adapter_file`);
- its metadata (version, template, rank, verified accuracy) comes from the package manifest when
  the manifest describes this exact file (sha256).

The registry uses it on every Load; the cluster's adapter catalog uses it to check a Load once for
all replicas, with no engine at hand.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass, field, replace
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
from loraplex.adapters.package.output import OutputConstraint
from loraplex.adapters.package.reader import Package
from loraplex.adapters.package.template import PromptTemplate
from loraplex.runtime.errors import (
    AdapterFileNotFound,
    AdapterFileUnusable,
    AdapterIncompatible,
    InvalidRequest,
    LoraplexError,
    PermissionDenied,
    quoted,
)

MAX_PATH_CHARS = 1024  # a Load path longer than this is refused before the filesystem sees it
MAX_NAME_BYTES = 255  # one path component (a file or directory name), as Linux allows
DIGEST_SUFFIX = ".sha256"  # `<file>.sha256` beside an adapter file: its sha256 (sha256sum's format)
SHA256 = re.compile(r"[0-9a-f]{64}")


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
    accuracy: Accuracy | None = None  # as export verified it (the manifest entry of this exact file)
    output: OutputConstraint | None = None  # the task's default output contract
    # (size, mtime_ns, inode) before its bytes were hashed: a later read of the same file needs no new hash
    fingerprint: tuple[int, int, int] | None = None


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

    def read(self, name: str, file: Path, version: str | None = None,
             template: PromptTemplate | None = None,
             output: OutputConstraint | None = None,
             recorded: str | None = None) -> tuple[CheckedAdapter, AdapterWeights]:
        """Verify the file's bytes, check it against the graph, describe it (blocking: reads and hashes).

        `recorded`: the sha256 an adapter store records for the file (it decides instead of
        `<file>.sha256` or the manifest).

        The version is `version`, else the manifest's for this file, else the file's sha256 prefix;
        the template is the manifest's for this file, else `template` (a replacement keeps serving
        the task of the version it replaces); the output contract likewise.
        """
        manifests = self._manifests()
        try:
            fingerprint = file_fingerprint(file)
            sha = file_sha256(file)
            if recorded is not None:
                _match_digest(file, sha, recorded.lower(), "the adapter store's record")
            else:
                self._verify_digest(file, sha, [e for m in manifests for e in m.adapters.values()])
            weights = replace(read_adapter_file(file, self.package.lora_inputs), sha256=sha)
            size = file.stat().st_size
        except AdapterFileError as exc:
            raise AdapterIncompatible(
                f"adapter {name!r} does not fit this package's graph: {exc}; "
                "re-export it for this package with `loraplex adapters add`"
            ) from exc
        except OSError as exc:
            raise _path_error(file.name, exc) from None
        entry = next((e for m in manifests if (e := m.adapters.get(name)) is not None and e.sha256 == sha), None)
        if entry is not None and entry.template:
            template = PromptTemplate.from_dict(entry.template)
        if entry is not None and entry.output:
            output = entry.output_constraint()
        found = CheckedAdapter(
            name=name,
            version=version or (entry.version if entry else sha[:12]),
            file=file,
            rank=entry.rank if entry else weights.rank,
            target_modules=list(entry.target_modules) if entry else _projections(weights),
            template=template,
            sha256=sha,
            size_bytes=size,
            accuracy=entry.accuracy if entry else None,
            output=output,
            fingerprint=fingerprint,
        )
        return found, weights

    def _manifests(self) -> list[Manifest]:
        """The package manifest as it is on disk now (an adapter added to the package with `loraplex
        adapters add` while serving is described there), then the one the package was opened with (a
        package verified in process before its manifest is written, or a candidate adapter)."""
        try:
            return [Manifest.load(self.package.root), self.package.manifest]
        except (ManifestError, OSError):
            return [self.package.manifest]

    def _verify_digest(self, file: Path, sha: str, entries: list[AdapterEntry]) -> None:
        """The file's sha256 must be the one recorded for it: in `<file>.sha256` beside it, else in the
        manifest entry whose file it is; a file with neither must be byte-identical to an adapter the
        manifest records (a copy of a package adapter). Flipped bytes never reach the parser."""
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
        _match_digest(file, sha, expected, source)


def _match_digest(file: Path, sha: str, expected: str, source: str) -> None:
    if sha != expected:
        raise AdapterFileUnusable(
            f"{file.name} does not match the sha256 recorded in {source} (its bytes hash to {sha[:16]}...): "
            "the file is corrupt or was changed after it was recorded; copy or export it again"
        )


def file_fingerprint(file: Path) -> tuple[int, int, int]:
    """(size, mtime_ns, inode): what changes when a file is rewritten or replaced."""
    st = os.stat(file)
    return st.st_size, st.st_mtime_ns, st.st_ino


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
