"""The batched engine's KV buffers: growth keeps the rows, an idle reset keeps short buffers."""

from __future__ import annotations

import numpy as np
from loraplex.runtime.engines.batched.kv import KEEP_CAPACITY, MIN_CAPACITY, KVCache


def _cache() -> KVCache:
    return KVCache(layers=2, max_batch=3, kv_heads=2, max_len=1024, head_size=4)


def test_growth_keeps_the_running_rows_and_a_reset_keeps_short_buffers():
    kv = _cache()
    assert kv.capacity == MIN_CAPACITY
    kv.keys[0][1, :, :10] = 7.0
    kv.ensure(MIN_CAPACITY + 1, rows=2)
    assert kv.capacity == 2 * MIN_CAPACITY and kv.growths == 1
    assert (kv.keys[0][1, :, :10] == 7.0).all() and not kv.keys[0][1, :, 10:].any()
    generation = kv.generation
    kv.reset()  # idle with a short buffer: kept (the next request of that length needs no reallocation)
    assert kv.capacity == KEEP_CAPACITY and kv.generation == generation
    kv.ensure(KEEP_CAPACITY + 1, rows=0)
    kv.reset()  # a long one: back to the smallest, so attention does not walk it for short requests
    assert kv.capacity == MIN_CAPACITY and kv.generation == generation + 2


def test_a_released_cache_is_made_again_at_the_smallest():
    kv = _cache()
    kv.ensure(300, rows=0)
    kv.release()
    assert kv.capacity == 0 and kv.keys == []
    kv.ensure(10, rows=0)
    assert kv.capacity == MIN_CAPACITY and len(kv.keys) == 2 and kv.keys[0].dtype == np.float32
