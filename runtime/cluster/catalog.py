"""AdapterCatalog: the cluster's adapter set, and how a change reaches every replica.

One catalog per cluster (a single-replica Serve deployment) holds the desired state: adapter
name -> the checked file and version that serves it (`CatalogState`, numbered by `generation`).
It starts with the package's adapters. Replicas do not hold every adapter: each loads the ones
routed to it, on demand, from the catalog's entry (`residency`).

Every engine replica follows the catalog with a long poll (`watch`): a call returns as soon as
the replica is behind (a newer generation, a report round it has not answered), else after a
heartbeat. The next call carries the replica's report (what it holds, requests in flight and
served per adapter version, failures), which is how the catalog learns that a change was
applied. A replica that has not polled for three heartbeats is considered gone (by the catalog's
`clock`, time.monotonic unless a test gives its own).

Consistency (what `Adapters.Load` / `Unload` promise on a cluster):
- Load checks the file once, here (name, path under the adapter root, fit to the graph), so a
  bad Load fails with the single server's status and changes nothing;
- a Load or Unload returns once every live replica has applied it: a request that starts after
  it returned is served by the new version (or gets NOT_FOUND) on any replica;
- while it is in progress, replicas switch one by one: a request may still get the old version
  on a replica that has not switched yet; requests in flight always finish on the version they
  started with (each replica's registry keeps it until its last request);
- Unload waits for requests in flight on every replica; `no_wait` refuses (FAILED_PRECONDITION)
  when any replica reports one, checked just before the removal (a request that starts between
  the check and the removal is waited for, not refused);
- the state lives in the catalog's memory: if its replica restarts, the cluster falls back to
  the package's adapters (replicas follow). Add adapters to the package (`loraplex adapters
  add`) to make them survive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loraplex.adapters.package.reader import Package
from loraplex.adapters.package.template import PromptTemplate
from loraplex.runtime.errors import AdapterBusy, AdapterIncompatible, AdapterNotFound, ClusterBehind
from loraplex.runtime.server.adapter_files import AdapterFiles, CheckedAdapter

log = logging.getLogger(__name__)

HEARTBEAT_S = 2.0  # a watch returns at least this often; three missed heartbeats = replica gone
REPORT_TIMEOUT_S = 5.0  # a report round waits this long for every live replica
APPLY_TIMEOUT_S = 600.0  # a Load/Unload waits this long for every live replica to apply it


@dataclass(frozen=True)
class CatalogEntry:
    serial: int  # unique per Load: a replica holding another serial of this name reloads
    adapter: CheckedAdapter


@dataclass(frozen=True)
class CatalogState:
    catalog_id: str  # changes when the catalog restarts
    generation: int
    entries: dict[str, CatalogEntry]

    def names(self) -> list[str]:
        return sorted(self.entries)

    def not_found(self, name: str) -> AdapterNotFound:
        """The single server's NOT_FOUND, naming the cluster's adapters."""
        loaded = ", ".join(self.names()) or "none"
        return AdapterNotFound(f"adapter {name!r} is not loaded; loaded adapters: {loaded} (empty name = base model)")


@dataclass
class ReplicaReport:
    """What a replica tells the catalog with each watch call."""

    replica: str
    catalog_id: str = ""
    seen: int = -1  # the newest generation the replica received (and is applying)
    applied: int = -1  # the newest generation it has applied completely (unloads drained)
    answered: int = 0  # the last report round it answered
    serving: bool = True  # False once the replica stops (drain)
    held: dict[str, str] = field(default_factory=dict)  # adapter -> version loaded
    in_flight: dict[str, int] = field(default_factory=dict)  # adapter -> requests in flight (current version)
    served: dict[tuple[str, str], int] = field(default_factory=dict)  # (adapter, version) -> requests, cumulative
    failed: dict[str, str] = field(default_factory=dict)  # adapter -> why the catalog's version did not load
    metrics: str = ""  # Prometheus text, when the round asked for it
    pid: int = 0
    node: str = ""


@dataclass(frozen=True)
class CatalogUpdate:
    state: CatalogState
    round: int  # the newest report round: answer it
    metrics_round: int  # the newest round that asked for metrics: send them if not sent since


@dataclass(frozen=True)
class AdapterStatus:
    """One adapter as `Adapters.List` shows it: the catalog's entry plus usage summed over replicas."""

    adapter: CheckedAdapter
    in_flight: int
    served: int
    replicas: int  # replicas holding it now


class AdapterCatalog:
    def __init__(self, package: Package, adapter_root: Path, *, heartbeat_s: float = HEARTBEAT_S,
                 clock: Callable[[], float] = time.monotonic):
        self.files = AdapterFiles(package, adapter_root)
        self.heartbeat_s = heartbeat_s
        self.clock = clock  # when each replica last polled, and so which replicas are live
        self.state = CatalogState(uuid.uuid4().hex[:12], 0, {})
        self._serial = 0
        self._reports: dict[str, ReplicaReport] = {}
        self._seen: dict[str, float] = {}
        self._changed = asyncio.Condition()
        self._round = 0
        self._metrics_round = 0
        self._metrics: dict[str, str] = {}  # replica -> its latest Prometheus text
        self._admin = asyncio.Lock()
        self.state = self._with(_package_adapters(package, self._next_serial))

    # -- replicas ---------------------------------------------------------------------------
    async def watch(self, report: ReplicaReport, timeout: float | None = None) -> CatalogUpdate:
        """Record `report`; return the state as soon as the replica is behind, else after a heartbeat."""
        async with self._changed:
            self._reports[report.replica] = report
            self._seen[report.replica] = self.clock()
            if report.metrics:
                self._metrics[report.replica] = report.metrics
            self._changed.notify_all()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait_for(lambda: self._behind(report)),
                                       self.heartbeat_s if timeout is None else timeout)
            return CatalogUpdate(self.state, self._round, self._metrics_round)

    async def leave(self, replica: str) -> None:
        """A stopping replica: stop waiting for it."""
        async with self._changed:
            self._reports.pop(replica, None)
            self._seen.pop(replica, None)
            self._metrics.pop(replica, None)
            self._changed.notify_all()

    def replicas(self) -> list[ReplicaReport]:
        """The live replicas' last reports."""
        cutoff = self.clock() - 3 * self.heartbeat_s
        return [r for name, r in sorted(self._reports.items()) if self._seen.get(name, 0.0) >= cutoff]

    def serving(self) -> bool:
        """True if at least one live replica serves the current adapter set."""
        return any(r.serving and self._applied(r, self.state.generation) for r in self.replicas())

    # -- admin ------------------------------------------------------------------------------
    async def load(self, name: str, path: str, version: str | None = None) -> CheckedAdapter:
        """Check the file, record it as `name`'s version, wait until every live replica applied it."""
        self.files.check_name(name)
        file = self.files.resolve(path)
        async with self._admin:
            current = self.state.entries.get(name)
            template = current.adapter.template if current else None
            output = current.adapter.output if current else None
            checked, _ = await asyncio.to_thread(self.files.read, name, file, version or None, template, output)
            await self._publish({**self.state.entries, name: CatalogEntry(self._next_serial(), checked)})
            failed = {r.replica: r.failed[name] for r in self.replicas() if name in r.failed}
            if failed:
                why = "; ".join(f"{replica}: {reason}" for replica, reason in sorted(failed.items()))
                raise AdapterIncompatible(
                    f"adapter {name!r} version {checked.version} is recorded, but {len(failed)} replica(s) could not "
                    f"load it and refuse {name!r} until they can ({why}); make the file readable on every node"
                )
        log.info("catalog: adapter %s version %s from %s (generation %d)", name, checked.version, file,
                 self.state.generation)
        return checked

    async def unload(self, name: str, wait: bool = True) -> tuple[CheckedAdapter, int]:
        """Remove `name`; returns its adapter and the requests its version served on all replicas."""
        async with self._admin:
            entry = self.state.entries.get(name)
            if entry is None:
                raise self.state.not_found(name)
            if not wait:
                busy = sum(r.in_flight.get(name, 0) for r in await self._report_round())
                if busy:
                    raise AdapterBusy(
                        f"adapter {name!r} has {busy} request(s) in flight on the cluster; unload with waiting, "
                        "or retry later"
                    )
            await self._publish({n: e for n, e in self.state.entries.items() if n != name})
            key = (name, entry.adapter.version)
            served = sum(r.served.get(key, 0) for r in self.replicas())
        log.info("catalog: adapter %s version %s unloaded after %d request(s)", name, entry.adapter.version, served)
        return entry.adapter, served

    async def status(self) -> list[AdapterStatus]:
        """Every adapter with usage summed over the live replicas (a fresh report round)."""
        reports = await self._report_round()
        listed = []
        for name in self.state.names():
            adapter = self.state.entries[name].adapter
            key = (name, adapter.version)
            holders = [r for r in reports if r.held.get(name) == adapter.version]
            listed.append(AdapterStatus(adapter, sum(r.in_flight.get(name, 0) for r in holders),
                                        sum(r.served.get(key, 0) for r in reports), len(holders)))
        return listed

    async def metrics(self) -> dict[str, str]:
        """Each live replica's Prometheus text (a fresh report round)."""
        return {r.replica: self._metrics.get(r.replica, "") for r in await self._report_round(want_metrics=True)}

    # -- internals --------------------------------------------------------------------------
    def _next_serial(self) -> int:
        self._serial += 1
        return self._serial

    def _with(self, entries: dict[str, CatalogEntry]) -> CatalogState:
        return CatalogState(self.state.catalog_id, self.state.generation + 1, entries)

    def _applied(self, report: ReplicaReport, generation: int) -> bool:
        return report.catalog_id == self.state.catalog_id and report.applied >= generation

    def _behind(self, report: ReplicaReport) -> bool:
        if report.catalog_id != self.state.catalog_id or report.seen < self.state.generation:
            return True
        return report.answered < self._round

    async def _publish(self, entries: dict[str, CatalogEntry]) -> None:
        async with self._changed:
            self.state = self._with(entries)
            self._changed.notify_all()
        generation = self.state.generation
        await self._until(lambda r: self._applied(r, generation), APPLY_TIMEOUT_S, "apply the change")

    async def _report_round(self, want_metrics: bool = False) -> list[ReplicaReport]:
        async with self._changed:
            self._round += 1
            if want_metrics:
                self._metrics_round = self._round
            self._changed.notify_all()
        round_ = self._round
        try:
            await self._until(lambda r: r.answered >= round_, REPORT_TIMEOUT_S, "report")
        except ClusterBehind as exc:  # a round is best effort: answer with the reports at hand
            log.warning("%s", exc)
        return self.replicas()

    async def _until(self, done, timeout: float, what: str) -> None:
        """Wait until `done(report)` holds for every live replica (replicas may leave meanwhile)."""
        deadline = time.monotonic() + timeout
        async with self._changed:
            while True:
                lagging = [r.replica for r in self.replicas() if not done(r)]
                if not lagging:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ClusterBehind(
                        f"replica(s) {', '.join(lagging)} did not {what} within {timeout:.0f}s (generation "
                        f"{self.state.generation}); they get it when they next reach the catalog"
                    )
                # wake at least each heartbeat: a replica that stopped polling drops out of `replicas()`
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), min(left, self.heartbeat_s))


def _package_adapters(package: Package, serial) -> dict[str, CatalogEntry]:
    """The package's own adapters, as the manifest describes them (no file read: they passed export)."""
    entries = {}
    for name, entry in sorted(package.manifest.adapters.items()):
        file = package.adapter_path(name)
        template = PromptTemplate.from_dict(entry.template) if entry.template else None
        checked = CheckedAdapter(name=name, version=entry.version, file=file, rank=entry.rank,
                                 target_modules=list(entry.target_modules), template=template, sha256=entry.sha256,
                                 size_bytes=entry.size_bytes, output=entry.output_constraint())
        entries[name] = CatalogEntry(serial(), checked)
    return entries
