"""Give the heap's free memory back to the operating system when the engine goes idle.

glibc keeps memory that was freed (an adapter's host copy once its bank slot holds it, a grown
bank's old arrays, onnxruntime's activations when its arena is off) in its heaps for reuse, and
RSS never comes down. `malloc_trim(0)` returns the free pages: about 40 MiB after the first
requests of a SmolLM2 server. It walks the heaps (a few milliseconds), so the engine calls it only
once it has been idle for a moment. Elsewhere (musl, macOS, Windows) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_trim = None


def _malloc_trim():
    global _trim
    if _trim is None:
        try:
            _trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _trim = False
    return _trim


def release_free_heap() -> None:
    trim = _malloc_trim()
    if trim:
        trim(0)
