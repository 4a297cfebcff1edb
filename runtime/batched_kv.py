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
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort


class KVCache:
    def __init__(self, layers: int, max_batch: int, kv_heads: int, max_len: int, head_size: int):
        self.layers = layers
        self.max_batch = max_batch
        self.max_len = max_len
        shape = (max_batch, kv_heads, max_len, head_size)
        self.keys = [np.zeros(shape, dtype=np.float32) for _ in range(layers)]
        self.values = [np.zeros(shape, dtype=np.float32) for _ in range(layers)]
        self._views: dict[tuple[int, int], list[tuple[ort.OrtValue, ort.OrtValue]]] = {}

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.keys) * 2

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
