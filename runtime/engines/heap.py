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
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_ARENA_MAX = -8  # mallopt's parameter number (glibc malloc.h)
_libc: ctypes.CDLL | None | bool = None


def _glibc():
    global _libc
    if _libc is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc = libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else False
        except OSError:
            _libc = False
    return _libc


def release_free_heap() -> None:
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)


def limit_heap_arenas(count: int) -> bool:
    """At most `count` malloc arenas from now on (threads that already have one keep it); call
    before threads start. False where this is not glibc."""
    libc = _glibc()
    return bool(libc) and libc.mallopt(M_ARENA_MAX, count) == 1
