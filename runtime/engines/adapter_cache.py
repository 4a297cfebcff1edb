"""The host tier of an engine's adapters: host copies bounded in bytes, least recently used dropped first.

Three tiers, nearest first: a bank slot (the batched engine: what a step reads), a host copy (the
batched engine's compact arrays; the genai engine's `og.Adapters` entry, memory-mapped from the file),
and the file on disk. An adapter version is registered when the engine loads it and forgotten when
it unloads. Its host copy counts against `budget` bytes; beyond it the least recently used copies that
no job holds and that are not pinned are dropped (the engine's `drop`), to be read again from the
file (`reload`, on an I/O thread) when a job needs them.

A job holds its adapter from submit to release (`hold_job` / `release_job`): a held adapter is never
dropped. `hold_job` returns a Future when the adapter is on disk: the engine core keeps the job off
the executor's queue until it completes (`Executor.prerequisite`), so the file is read while the
current steps run. Concurrent jobs of one adapter share one read. A job the engine forgets to release
lets go of its hold when it is garbage (weak references), so an adapter is never held forever.

Thread safety: every state change is under one lock; `drop` runs under it and returns what must run
after it (e.g. onnxruntime-genai's unload, which takes the engine's own lock).
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from loraplex.adapters.package.adapter_file import AdapterFileError, AdapterWeights, read_adapter_file
from loraplex.adapters.package.lora_inputs import LoraInputs
from loraplex.adapters.package.manifest import file_sha256
from loraplex.runtime.engines.base import AdapterHandle, GenerationJob
from loraplex.runtime.errors import AdapterFileUnusable

log = logging.getLogger(__name__)

MIB = 1 << 20
DEFAULT_MAX_BYTES = 2048 * MIB  # the default budget's ceiling
DEFAULT_FRACTION = 10  # default budget: a tenth of the machine's memory (at most DEFAULT_MAX_BYTES)

SLOT, HOST, DISK = "slot", "host", "disk"


def default_budget() -> int:
    """A tenth of physical memory, at most 2 GiB: room for hundreds of rank-8 adapters of a small model."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return DEFAULT_MAX_BYTES
    return min(DEFAULT_MAX_BYTES, total // DEFAULT_FRACTION)


@dataclass
class Residency:
    """Where one adapter version is, and what it has cost so far."""

    tier: str = HOST
    nbytes: int = 0  # its host copy's bytes (also while in a slot or on disk: what a copy costs)
    loads: int = 1  # reads of its file (the first load included)
    evictions: int = 0  # host copies dropped
    slot_hits: int = 0  # jobs that found it in a bank slot
    host_hits: int = 0  # ... in host memory
    misses: int = 0  # ... on disk (read again)
    pinned: bool = False
    sha256: str = ""  # its file's digest: a reload must read the same bytes
    fingerprint: tuple[int, int, int] | None = None  # its file's (size, mtime_ns, inode) when it was hashed


# Read the file again and make the host copy, installing it under the lock only if the handle is still
# `registered` (else discarding it); returns its bytes.
Reload = Callable[[AdapterHandle], int]
Drop = Callable[[AdapterHandle], Callable[[], None] | None]  # drop the host copy (under the lock)
# (adapter name, event): "slot", "host" or "disk" (where a job found it: disk is a miss), or "evicted".
Observer = Callable[[str, str], None]


class HostCache:
    def __init__(self, budget: int | None, *, reload: Reload, drop: Drop):
        self.budget = default_budget() if budget is None else max(0, int(budget))
        self._reload, self._drop = reload, drop
        self.observer: Observer | None = None
        self.pinned_names: set[str] = set()  # versions of these names are pinned from their load on
        self.lock = threading.RLock()
        self._state: dict[AdapterHandle, Residency] = {}
        self._lru: OrderedDict[AdapterHandle, None] = OrderedDict()  # host-tier copies, least recent first
        self._holders: dict[AdapterHandle, weakref.WeakSet[GenerationJob]] = {}
        self._held: weakref.WeakKeyDictionary[GenerationJob, AdapterHandle] = weakref.WeakKeyDictionary()
        self._loading: dict[AdapterHandle, Future] = {}
        self._io: ThreadPoolExecutor | None = None
        self.bytes = 0  # host copies now

    # -- registration -----------------------------------------------------------------------
    def register(self, handle: AdapterHandle, nbytes: int, sha256: str = "") -> None:
        """A loaded version with its host copy (`nbytes`)."""
        with self.lock:
            self._state[handle] = Residency(nbytes=nbytes, sha256=sha256, pinned=handle.name in self.pinned_names)
            self._holders[handle] = weakref.WeakSet()
            self._to_host(handle, nbytes)
        self._enforce()

    def forget(self, handle: AdapterHandle) -> None:
        """An unloaded version: it no longer counts."""
        with self.lock:
            if self._state.pop(handle, None) is not None and handle in self._lru:
                self._lru.pop(handle)
            self.bytes = sum(self._state[h].nbytes for h in self._lru)
            self._holders.pop(handle, None)

    def record_sha256(self, handle: AdapterHandle, sha256: str,
                      fingerprint: tuple[int, int, int] | None = None) -> None:
        """The digest of the file `handle` was loaded from: reloads must match it (a file whose
        `fingerprint`, (size, mtime_ns, inode) taken before hashing, is unchanged is not hashed again)."""
        with self.lock:
            if handle in self._state:
                self._state[handle].sha256 = sha256
                self._state[handle].fingerprint = fingerprint

    def registered(self, handle: AdapterHandle) -> bool:
        with self.lock:
            return handle in self._state

    def residency(self, handle: AdapterHandle) -> Residency | None:
        with self.lock:
            state = self._state.get(handle)
            return None if state is None else Residency(**vars(state))

    def pin(self, handle: AdapterHandle, pinned: bool = True) -> None:
        """Keep (or stop keeping) the host copy whatever the budget; a pinned adapter on disk is read now."""
        with self.lock:
            state = self._state.get(handle)
            if state is None:
                return
            state.pinned = pinned
            if pinned and state.tier == DISK and handle not in self._loading:
                self._start_reload(handle)
        self._enforce()

    # -- tier moves (the engine reports them) -------------------------------------------------
    def in_slot(self, handle: AdapterHandle) -> None:
        """The batched engine copied it into a bank slot and dropped its host copy."""
        with self.lock:
            state = self._state.get(handle)
            if state is not None:
                self._lru.pop(handle, None)
                state.tier = SLOT
                self.bytes = sum(self._state[h].nbytes for h in self._lru)

    def parked(self, handle: AdapterHandle, nbytes: int) -> None:
        """The batched engine copied it out of its slot into a host copy."""
        with self.lock:
            if handle in self._state:
                self._to_host(handle, nbytes)
        self._enforce()

    # -- jobs ---------------------------------------------------------------------------------
    def hold_job(self, job: GenerationJob) -> Future | None:
        """Hold the job's adapter until `release_job`; a Future while its file is read again."""
        handle = job.adapter
        if handle is None:
            return None
        with self.lock:
            state = self._state.get(handle)
            if state is None:  # unloaded meanwhile: the executor refuses the job
                return None
            self._holders[handle].add(job)
            self._held[job] = handle
            outcome = state.tier if state.tier in (SLOT, HOST) else DISK
            if state.tier == SLOT:
                state.slot_hits += 1
            elif state.tier == HOST:
                state.host_hits += 1
                self._lru.move_to_end(handle)
            else:
                state.misses += 1
            future = self._loading.get(handle)
            if state.tier == DISK and future is None:
                future = self._start_reload(handle)
        if self.observer is not None:
            self.observer(handle.name, outcome)
        return future

    def release_job(self, job: GenerationJob) -> None:
        with self.lock:
            handle = self._held.pop(job, None)
            if handle is not None and handle in self._holders:
                self._holders[handle].discard(job)
        self._enforce()

    def close(self) -> None:
        if self._io is not None:
            self._io.shutdown(wait=True)

    # -- internals ----------------------------------------------------------------------------
    def _to_host(self, handle: AdapterHandle, nbytes: int) -> None:
        state = self._state[handle]
        state.tier, state.nbytes = HOST, nbytes
        self._lru[handle] = None
        self._lru.move_to_end(handle)
        self.bytes = sum(self._state[h].nbytes for h in self._lru)

    def _start_reload(self, handle: AdapterHandle) -> Future:
        if self._io is None:
            self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraplex-adapter-io")
        future = self._io.submit(self._reload_one, handle)
        self._loading[handle] = future
        return future

    def _reload_one(self, handle: AdapterHandle) -> None:
        try:
            nbytes = self._reload(handle)
        except Exception as exc:
            log.warning("adapter %s@%s could not be read again: %s", handle.name, handle.version, exc)
            raise
        finally:
            with self.lock:
                self._loading.pop(handle, None)
        with self.lock:
            state = self._state.get(handle)
            if state is not None:
                state.loads += 1
                self._to_host(handle, nbytes)
        self._enforce()

    def _enforce(self) -> None:
        """Drop the least recently used host copies nobody holds until the copies fit the budget."""
        after: list[Callable[[], None]] = []
        evicted: list[str] = []
        with self.lock:
            for handle in list(self._lru):
                if self.bytes <= self.budget:
                    break
                state = self._state[handle]
                if state.pinned or self._holders[handle] or handle in self._loading:
                    continue
                finish = self._drop(handle)
                if finish is not None:
                    after.append(finish)
                self._lru.pop(handle)
                state.tier = DISK
                state.evictions += 1
                self.bytes -= state.nbytes
                evicted.append(handle.name)
        if self.observer is not None:
            for name in evicted:
                self.observer(name, "evicted")
        for finish in after:
            try:
                finish()
            except Exception:
                log.exception("dropping an adapter's host copy failed")


class JobHolds:
    """An executor's side of the cache: hold at `prerequisite`, release when the job is let go, and
    the read failures that refuse a job."""

    def __init__(self, cache: HostCache):
        self.cache = cache
        self._failed: weakref.WeakKeyDictionary[GenerationJob, BaseException] = weakref.WeakKeyDictionary()

    def prerequisite(self, job: GenerationJob, other: Future | None = None) -> Future | None:
        """What `job` waits for: its adapter's file read again (if on disk), and `other` (if any)."""
        hold = self.cache.hold_job(job)
        if hold is not None:
            hold.add_done_callback(lambda f: self._note(job, f))
        return both(hold, other)

    def refusal(self, job: GenerationJob) -> BaseException | None:
        """The read failure of the job's adapter (the job then holds nothing), or None."""
        error = self._failed.pop(job, None)
        if error is not None:
            self.cache.release_job(job)
        return error

    def release(self, jobs: Any) -> None:
        for job in jobs:
            self.cache.release_job(job)

    def _note(self, job: GenerationJob, future: Future) -> None:
        if not future.cancelled() and future.exception() is not None:
            self._failed[job] = future.exception()  # type: ignore[assignment]


def both(first: Future | None, second: Future | None) -> Future | None:
    """A Future done when both are (its error the first's, then the second's); None for none."""
    if first is None or second is None:
        return first or second
    done: Future = Future()
    left = [2]
    lock = threading.Lock()

    def one_done(_: Future) -> None:
        with lock:
            left[0] -= 1
            if left[0]:
                return
        error = next((f.exception() for f in (first, second) if not f.cancelled() and f.exception()), None)
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(None)

    first.add_done_callback(one_done)
    second.add_done_callback(one_done)
    return done


def reread(handle: AdapterHandle, cache: HostCache, inputs: LoraInputs) -> AdapterWeights:
    """(Blocking) an adapter's file read again, refused unless its bytes are those it was loaded from
    (hashed again only when the file's size, mtime or inode differ from when it was hashed)."""
    state = cache.residency(handle)
    try:
        recorded = state.fingerprint if state is not None else None
        unchanged = recorded is not None and _fingerprint(handle.path) == recorded
        if state is not None and state.sha256 and not unchanged and file_sha256(handle.path) != state.sha256:
            raise AdapterFileUnusable(f"the file of adapter {handle.name}@{handle.version} ({handle.path.name}) "
                                      "changed since it was loaded; load it again")
        return read_adapter_file(handle.path, inputs)
    except AdapterFileError as exc:
        raise AdapterFileUnusable(f"adapter {handle.name}@{handle.version} could not be read again: {exc}") from exc
    except OSError as exc:
        raise AdapterFileUnusable(f"the file of adapter {handle.name}@{handle.version} cannot be read again "
                                  f"({exc.strerror or exc}); load it again") from None


def _fingerprint(path: Any) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino
