"""Batch-1 memory-bandwidth roofline: the fastest any engine can decode one stream.

Decoding one token reads every weight once, so tokens/s <= copy bandwidth / weight bytes per
token. The bandwidth is measured here, in the same run, with numpy copies of a buffer far
larger than the last-level cache (a copy reads and writes each byte: 2 x size per copy).
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class Bandwidth:
    gb_per_s: float  # best of the repeats (what the memory system can do)
    median_gb_per_s: float  # typical, on a shared machine
    buffer_mb: int


def measure_copy_bandwidth(buffer_mb: int = 512, repeats: int = 7) -> Bandwidth:
    """Copy bandwidth (read + write bytes per second) of one thread, as numpy's memcpy sees it."""
    import numpy as np

    n = buffer_mb * (1 << 20) // 8
    src = np.ones(n, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in before timing
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        elapsed = time.perf_counter() - start
        rates.append(2 * src.nbytes / elapsed / 1e9)
    rates.sort()
    return Bandwidth(gb_per_s=rates[-1], median_gb_per_s=rates[len(rates) // 2], buffer_mb=buffer_mb)


def roofline_tokens_per_s(bytes_per_token: int, bandwidth: Bandwidth) -> float:
    return bandwidth.gb_per_s * 1e9 / bytes_per_token
