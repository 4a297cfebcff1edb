"""The KV cache of the batched engine: one preallocated buffer per layer, rows kept compact.

Layout: `[max_batch, kv_heads, max_len, head]` per layer for keys and for values, the layout
GroupQueryAttention reads. Row i of the running batch is buffer row i; its first `len_i`
positions hold its tokens (right padding: whatever lies past `len_i` is never read).

Why this works with one shared buffer and no copies per step:
- GQA's CPU kernel shares past and present when both are bound to the same memory
  (past_present_share_buffer): it writes the new token's K/V at position `seqlens_k[i]` of
  row i in place, and attends over positions `[0, seqlens_k[i]]` only. `seqlens_k` is the
  graph's ReduceSum(attention_mask) - 1, so each row's own length comes from its mask row:
  rows of different lengths share a step, and padding cannot change any row's result.
- A prefix `buffer[a:b]` of a C-contiguous array is contiguous, so an OrtValue over it is a
  view: the decode step binds rows `[0, n)`, a prefill binds the new rows `[n, n+k)`.
- When a row leaves, the last row moves into its place (one row's valid prefix is copied),
  so the batch stays `[0, n)` and a step never computes empty rows.
- The position axis grows on demand (powers of two up to `max_len`; the rows' valid prefixes
  are copied once per growth) and shrinks back when the batch empties (unless it is still
  short, `KEEP_CAPACITY`): GQA's CPU kernel
  allocates and walks score buffers as long as the cache, so a cache sized to the longest
  running row rather than to the whole context makes attention cheaper (8.7% instead of 12.9%
  of kernel time at 16 rows of 96 tokens on the bench-size model).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

MIN_CAPACITY = 64
KEEP_CAPACITY = 2 * MIN_CAPACITY  # an idle engine keeps buffers this long (see `reset`)


class KVCache:
    def __init__(self, layers: int, max_batch: int, kv_heads: int, max_len: int, head_size: int):
        self.layers = layers
        self.max_batch = max_batch
        self.max_len = max_len
        self._kv_heads = kv_heads
        self._head_size = head_size
        self.capacity = 0
        self.growths = 0  # reallocations while rows ran (a metric)
        self.generation = 0  # counts reallocations: views bound before one are stale
        self.keys: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self._views: dict[tuple[int, int], list[tuple[ort.OrtValue, ort.OrtValue]]] = {}
        self.reset()

    def reset(self) -> None:
        """Back to the smallest buffers (call only when no row is running); buffers of up to
        `KEEP_CAPACITY` positions are kept as they are: a request of a 64-token prompt and 64 new
        tokens would otherwise reallocate twice (64, then 128 positions) every time it follows another."""
        if not self.capacity or self.capacity > KEEP_CAPACITY:
            self._reallocate(min(MIN_CAPACITY, self.max_len), keep_rows=0)

    def release(self) -> None:
        """Free the buffers (call only when no row is running); the next `ensure` makes the smallest again.
        A server at rest holds no cache (4 rows of SmolLM2-135M at the smallest length: 11 MiB)."""
        self.keys, self.values, self.capacity = [], [], 0
        self._views.clear()
        self.generation += 1

    def ensure(self, positions: int, rows: int) -> None:
        """Make room for `positions` tokens per row, keeping the first `rows` rows' contents."""
        if positions > self.max_len:
            raise ValueError(f"{positions} positions exceed the cache's {self.max_len}")
        if positions > self.capacity:
            if not self.capacity:  # released: nothing to keep, and not a growth while rows ran
                self.reset()
                self.ensure(positions, rows=0)
                return
            capacity = self.capacity
            while capacity < positions:
                capacity *= 2
            self._reallocate(min(capacity, self.max_len), keep_rows=rows)
            self.growths += 1

    def _reallocate(self, capacity: int, keep_rows: int) -> None:
        shape = (self.max_batch, self._kv_heads, capacity, self._head_size)
        old = self.capacity
        keys = [np.zeros(shape, dtype=np.float32) for _ in range(self.layers)]
        values = [np.zeros(shape, dtype=np.float32) for _ in range(self.layers)]
        if keep_rows:
            for new, current in zip(keys + values, self.keys + self.values, strict=True):
                new[:keep_rows, :, :old] = current[:keep_rows]
        self.keys, self.values, self.capacity = keys, values, capacity
        self._views.clear()
        self.generation += 1

    def views(self, start: int, stop: int) -> list[tuple[ort.OrtValue, ort.OrtValue]]:
        """(key, value) OrtValues over rows [start, stop) of every layer, sharing the buffers."""
        key = (start, stop)
        views = self._views.get(key)
        if views is None:
            views = [
                (
                    ort.OrtValue.ortvalue_from_numpy(self.keys[i][start:stop]),
                    ort.OrtValue.ortvalue_from_numpy(self.values[i][start:stop]),
                )
                for i in range(self.layers)
            ]
            self._views[key] = views  # at most max_batch^2 small wrappers
        return views

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of row `src` into row `dst` (compaction)."""
        for buffers in (self.keys, self.values):
            for array in buffers:
                array[dst, :, :length] = array[src, :, :length]

    def read(self, row: int, start: int, stop: int) -> np.ndarray:
        """A copy of positions `[start, stop)` of `row`: `[2 * layers, kv_heads, stop - start, head]`,
        every layer's keys, then every layer's values."""
        return np.stack([array[row, :, start:stop] for array in self.keys + self.values])

    def write(self, row: int, start: int, blocks: list[np.ndarray], length: int) -> None:
        """Write the first `length` positions of `blocks` (`read`'s arrays, in order) into `row` from
        position `start` on."""
        joined = np.concatenate(blocks, axis=2) if len(blocks) > 1 else blocks[0]
        for i, array in enumerate(self.keys + self.values):
            array[row, :, start:start + length] = joined[i, :, :length]
