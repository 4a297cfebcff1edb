"""This process's mapped pages: which are present (`/proc/self/pagemap`), and handing clean ones back.

A page of a private file mapping that is present and still the file's own (never copied on write)
can be `madvise(MADV_DONTNEED)`ed safely: it is only unmapped from this process (the page cache
keeps it), and whatever reads it next, even while the drop runs, faults it back in with the same
bytes. A page copied on write (a shared library's relocated data, say) holds what is not in the
file and is never dropped. Linux only; elsewhere every call is a no-op.

`drop_start_up_code` uses that once per process, after start-up: the shared libraries' pages
(onnxruntime's, gRPC's, the interpreter's...) that imports, the session's creation and its graph
optimizers touched and serving never runs again stay resident otherwise, counted in RSS until the
kernel runs short of memory. Measured on SmolLM2-135M int4, 2 adapters, `--profile edge` (the
bench's memory scenario, each adapter served twice, RSS 2 s later): 247 -> 217 MiB, of which
onnxruntime's library 12 MiB, gRPC's 5, libcrypto 3 and the tokenizers library 2; serving
faults back what it runs (about 17 MiB of the 47 dropped) at the next requests, once.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import sys
import threading

import numpy as np

log = logging.getLogger(__name__)

MADV_DONTNEED = 4
PAGE = mmap.PAGESIZE
_PRESENT = np.uint64(1 << 63)
_FILE_PAGE = np.uint64(1 << 61)  # a file page (or shared anonymous); clear on a page copied on write
_madvise = None
start_up_dropped: int | None = None  # bytes `drop_start_up_code` dropped; None until it ran
_start_up_lock = threading.Lock()


def linux() -> bool:
    return sys.platform.startswith("linux")


def entries(pagemap, address: int, length: int) -> np.ndarray:
    """The `/proc/self/pagemap` entries (uint64) of the pages of [address, address + length), which
    must be page-aligned; `pagemap` is that file opened unbuffered for reading."""
    pagemap.seek(address // PAGE * 8)
    return np.frombuffer(pagemap.read(length // PAGE * 8), dtype="<u8")


def copied_on_write(entries: np.ndarray) -> np.ndarray:
    """Per page: present and not a file page (anonymous: a private mapping's page written to)."""
    return (entries & _PRESENT != 0) & (entries & _FILE_PAGE == 0)


def file_pages(entries: np.ndarray) -> np.ndarray:
    """Per page: present and still the file's own page."""
    return (entries & _PRESENT != 0) & (entries & _FILE_PAGE != 0)


def dontneed(address: int, length: int) -> bool:
    """madvise(MADV_DONTNEED) [address, address + length); False (logged) where it failed."""
    global _madvise
    if _madvise is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _madvise = libc.madvise
    if _madvise(address, length, MADV_DONTNEED) == 0:
        return True
    log.debug("madvise(%#x, %d) failed: %s", address, length, os.strerror(ctypes.get_errno()))
    return False


def code_mappings(maps: str) -> list[tuple[int, int]]:
    """(start, end) of the private, read-only mappings of files this process also maps executable
    (shared libraries, the interpreter), from the text of `/proc/self/maps`: their code and read-only
    data, never a data file (a model's weights are not mapped executable) nor a writable mapping."""
    rows = []
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/") and not fields[5].endswith(" (deleted)"):
            rows.append((fields[0], fields[1], fields[5]))
    executable = {path for _, perms, path in rows if "x" in perms}
    found = []
    for span, perms, path in rows:
        if path in executable and perms.endswith("p") and "w" not in perms:
            start, end = (int(x, 16) for x in span.split("-"))
            found.append((start, end))
    return found


def drop_clean_pages(spans: list[tuple[int, int]]) -> int:
    """Drop every run of present, never-written file pages in `spans` (page-aligned); the bytes dropped."""
    dropped = 0
    with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
        for start, end in spans:
            clean = file_pages(entries(pagemap, start, end - start))
            # runs of clean pages: [first, last) page indexes where the mask switches on and off
            edges = np.flatnonzero(np.diff(np.concatenate(([False], clean, [False])).astype(np.int8)))
            for first, last in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
                if not dontneed(start + first * PAGE, (last - first) * PAGE):
                    return dropped
                dropped += (last - first) * PAGE
    return dropped


def drop_start_up_code() -> int:
    """Once per process (later calls return 0): the clean pages of the shared libraries' code and
    read-only data out of RSS (`code_mappings`), so that what start-up alone ran leaves and what
    serving runs comes back at its next use. The engine calls it the first time it has been idle
    after the warm-up; the bytes dropped (0 elsewhere than Linux, or where it failed)."""
    global start_up_dropped
    with _start_up_lock:
        if start_up_dropped is not None:
            return 0
        dropped = 0
        try:
            if linux():
                with open("/proc/self/maps") as maps:
                    dropped = drop_clean_pages(code_mappings(maps.read()))
        except OSError as exc:  # no /proc (a sandbox): the pages stay
            log.debug("keeping the start-up code pages (%s)", exc)
        start_up_dropped = dropped
    log.debug("start-up code pages dropped: %.1f MiB", dropped / 2**20)
    return dropped
