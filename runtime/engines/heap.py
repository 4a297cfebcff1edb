"""The process heap (glibc): hand free memory back when idle; fewer arenas on a small device.

glibc keeps memory that was freed (an adapter's host copy once its bank slot holds it, a grown
bank's old arrays, onnxruntime's activations when its arena is off) in its heaps for reuse, and
RSS never comes down. `malloc_trim(0)` returns the free pages: about 40 MiB after the first
requests of a SmolLM2 server. It walks the heaps (a few milliseconds), so the engine calls it only
once it has been idle for a moment.

glibc also gives threads their own heaps ("arenas", up to 8 per core): onnxruntime's threads then
each keep fragments of freed activations. `limit_heap_arenas(1)` (`--profile edge`) makes threads
started afterwards share one: measured on SmolLM2 int4, an extra adapter then costs 3.8 MiB of
RSS instead of 8.6 (its file: 3.5 MiB), with single-stream speed within the noise.
Elsewhere (musl, macOS, Windows) both are no-ops.

`on_idle` adds what else goes back at those moments (the session cache's file pages that requests
faulted in but decoding does not keep reading: `runtime.engines.batched.pages`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import weakref
from collections.abc import Callable

M_ARENA_MAX = -8  # mallopt's parameter number (glibc malloc.h)
_libc: ctypes.CDLL | None | bool = None
_idle: weakref.WeakKeyDictionary[object, Callable[[], object]] = weakref.WeakKeyDictionary()
log = logging.getLogger(__name__)


def _glibc():
    global _libc
    if _libc is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc = libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else False
        except OSError:
            _libc = False
    return _libc


def on_idle(owner: object, release: Callable[[], object]) -> None:
    """`release()` runs at every `release_free_heap` for as long as `owner` lives (it must not hold
    `owner`); it may run on any engine's thread."""
    _idle[owner] = release


def release_free_heap() -> None:
    """Free heap back to the system, and each `on_idle` release run (its failure logged, never raised)."""
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)
    for release in list(_idle.values()):
        try:
            release()
        except Exception:  # a release is an optimization: it must never fail the engine's loop
            log.debug("an idle release failed", exc_info=True)


def limit_heap_arenas(count: int) -> bool:
    """At most `count` malloc arenas from now on (threads that already have one keep it); call
    before threads start. False where this is not glibc."""
    libc = _glibc()
    return bool(libc) and libc.mallopt(M_ARENA_MAX, count) == 1
