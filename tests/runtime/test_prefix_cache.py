"""The prefix cache's index (pure Python): keys by namespace and every token so far, blocks, the byte
bound with least recently used eviction, drop by namespace."""

from __future__ import annotations

import numpy as np
import pytest
from loraplex.runtime.engines.batched.prefix_cache import BASE, PrefixCache, adapter_namespace, weights_digest

B = 4  # tokens per block
BLOCK_BYTES = 8 * B  # payload below: one int64 per token


def _read(tokens):
    """A payload per block: the block's own token ids, so a test sees which positions it holds."""
    return lambda start, stop: np.asarray(tokens[start:stop], dtype=np.int64)


def _tokens(blocks):
    return [int(t) for block in blocks for t in block.payload]


def test_a_stored_prompt_serves_any_prompt_that_begins_with_its_full_blocks():
    cache = PrefixCache(max_bytes=10 * BLOCK_BYTES, block_tokens=B)
    template = list(range(100, 110))  # 2 full blocks and 2 tokens
    assert cache.store(BASE, template + [1, 2], _read(template + [1, 2])) == 3
    assert cache.bytes == 3 * BLOCK_BYTES and len(cache) == 3
    # Another request of the same template, other fields: the template's full blocks.
    assert _tokens(cache.match(BASE, template + [7, 8, 9])) == template[:8]
    assert _tokens(cache.match(BASE, template + [1, 2, 3])) == template + [1, 2]
    assert cache.match(BASE, [100, 101, 102]) == []  # not a full block
    assert cache.match(BASE, [999] + template) == []  # the same tokens elsewhere: another prefix
    assert cache.store(BASE, template + [1, 2, 3, 4], _read(template + [1, 2, 3, 4])) == 0  # nothing new


def test_namespaces_never_share_blocks():
    cache = PrefixCache(max_bytes=10 * BLOCK_BYTES, block_tokens=B)
    prompt = list(range(8))
    cache.store(adapter_namespace("a" * 64), prompt, _read(prompt))
    assert cache.match(adapter_namespace("b" * 64), prompt) == []
    assert cache.match(BASE, prompt) == []
    assert len(cache.match(adapter_namespace("a" * 64), prompt)) == 2


def test_the_byte_bound_evicts_the_least_recently_used_and_a_chain_keeps_its_first_blocks():
    cache = PrefixCache(max_bytes=4 * BLOCK_BYTES, block_tokens=B)
    first, second = list(range(8)), list(range(50, 58))
    cache.store(BASE, first, _read(first))
    cache.store(BASE, second, _read(second))
    cache.match(BASE, first)  # first is now the most recent
    third = list(range(80, 88))
    assert cache.store(BASE, third, _read(third)) == 2
    assert cache.bytes <= 4 * BLOCK_BYTES and cache.stats.evicted_blocks == 2
    assert cache.match(BASE, second) == [] and len(cache.match(BASE, first)) == 2
    # A longer prompt on a full cache: its second block goes before the first blocks of others.
    cache.store(BASE, first + [9, 9, 9, 9], _read(first + [9, 9, 9, 9]))
    assert len(cache.match(BASE, first + [9, 9, 9, 9])) == 3 and cache.bytes <= 4 * BLOCK_BYTES


def test_prompts_seen_once_evict_each_other_before_a_template_that_served_again():
    cache = PrefixCache(max_bytes=5 * BLOCK_BYTES, block_tokens=B)
    template = list(range(100, 108))
    cache.store(BASE, template, _read(template))
    assert len(cache.match(BASE, template + [1])) == 2  # served again: protected
    for seed in range(10):  # one-off prompts, each two blocks, more than the cache holds
        once = [1000 + 10 * seed + i for i in range(8)]
        cache.store(BASE, once, _read(once))
        assert cache.bytes <= 5 * BLOCK_BYTES
    assert _tokens(cache.match(BASE, template + [2])) == template
    assert len(cache.match(BASE, once)) == 2  # the latest one-off prompt is still there (probation)
    assert cache.stats.evicted_blocks == 22 - 5
    for seed in range(3):  # more templates served again: the protected segment keeps to its share (80%)
        other = [2000 + 10 * seed + i for i in range(8)]
        cache.store(BASE, other, _read(other))
        assert len(cache.match(BASE, other)) == 2
        protected = sum(block.nbytes for block in cache._blocks.values() if block.protected)
        assert protected <= 0.8 * 5 * BLOCK_BYTES and cache.bytes <= 5 * BLOCK_BYTES


def test_a_chain_is_not_stored_past_a_block_it_would_evict_from_itself():
    cache = PrefixCache(max_bytes=2 * BLOCK_BYTES, block_tokens=B)
    prompt = list(range(16))
    assert cache.store(BASE, prompt, _read(prompt)) == 2
    assert _tokens(cache.match(BASE, prompt)) == prompt[:8]
    assert PrefixCache(max_bytes=BLOCK_BYTES - 1, block_tokens=B).store(BASE, prompt, _read(prompt)) == 0


def test_drop_forgets_one_namespace_only():
    cache = PrefixCache(max_bytes=10 * BLOCK_BYTES, block_tokens=B)
    prompt = list(range(8))
    for namespace in (BASE, adapter_namespace("a")):
        cache.store(namespace, prompt, _read(prompt))
    assert cache.drop(adapter_namespace("a")) == 2
    assert cache.match(adapter_namespace("a"), prompt) == [] and len(cache.match(BASE, prompt)) == 2
    assert cache.bytes == 2 * BLOCK_BYTES and cache.stats.dropped_blocks == 2
    cache.clear()
    assert cache.bytes == 0 and len(cache) == 0


def test_record_counts_lookups_hits_and_tokens():
    cache = PrefixCache(max_bytes=BLOCK_BYTES, block_tokens=B)
    cache.record(prompt_tokens=10, reused=0)
    cache.record(prompt_tokens=12, reused=8)
    s = cache.stats
    assert (s.lookups, s.hits, s.tokens_reused, s.prompt_tokens) == (2, 1, 8, 22)


def test_weights_digest_is_the_content_not_the_name_of_anything():
    a = {"x.lora_A": np.ones((2, 3), np.float32), "x.lora_B": np.zeros((3, 2), np.float32)}
    same = {k: v.copy() for k, v in reversed(a.items())}
    assert weights_digest(a) == weights_digest(same)
    changed = {**a, "x.lora_B": np.full((3, 2), 1e-7, np.float32)}
    assert weights_digest(changed) != weights_digest(a)
    assert weights_digest({"y.lora_A": a["x.lora_A"], "x.lora_B": a["x.lora_B"]}) != weights_digest(a)


def test_a_negative_bound_is_refused():
    with pytest.raises(ValueError, match="max_bytes >= 0"):
        PrefixCache(max_bytes=-1)


# -- admission (the scheduler, still without a model) ---------------------------------------------

def _job(name: str, prompt: list[int], handle=None):
    from loraplex.runtime.engines.base import GenerationJob, SamplingParams

    class Sink:
        def on_output(self, output) -> None:
            raise AssertionError("not delivered by the scheduler")

    return GenerationJob(name, prompt, SamplingParams(max_new_tokens=4), handle, Sink())


def _adapter(name: str, digest: str):
    from pathlib import Path

    from loraplex.runtime.engines.batched.scheduler import BatchedAdapter

    return BatchedAdapter(name=name, version="1", path=Path(f"{name}.onnx_adapter"), weights=object(),  # type: ignore[arg-type]
                          digest=digest)


def test_admission_starts_a_row_from_its_namespace_s_cached_blocks_and_runs_uncached_rows_first():
    from loraplex.runtime.engines.batched.scheduler import Scheduler

    cache = PrefixCache(max_bytes=100 * BLOCK_BYTES, block_tokens=B)
    s = Scheduler(max_batch=4, max_slots=3, max_len=64, prefix=cache)
    template = list(range(100, 112))  # 3 blocks
    alpha, alpha_again, beta = _adapter("alpha", "a" * 64), _adapter("alpha", "c" * 64), _adapter("beta", "b" * 64)
    cache.store(adapter_namespace("a" * 64), template, _read(template))
    cache.store(BASE, template[:8], _read(template))
    for j in (_job("hit", template + [1, 2], alpha), _job("whole", template, alpha),
              _job("other", template + [1], beta), _job("new version", template + [3], alpha_again)):
        s.add(j)
    plan = s.schedule()
    rows = {row.job.request_id: row for row in plan.batch.rows}
    assert [row.job.request_id for row in plan.batch.rows] == ["other", "new version", "hit", "whole"]
    assert (rows["hit"].cached, _tokens_of(rows["hit"].prefix)) == (12, template)
    # The last two tokens are computed again: a prefill of one token would take the decoding kernels.
    assert (rows["whole"].cached, len(rows["whole"].prefix)) == (10, 3)
    assert rows["other"].cached == rows["new version"].cached == 0  # same name, other weights: nothing
    assert (cache.stats.lookups, cache.stats.hits, cache.stats.tokens_reused) == (4, 2, 22)
    s2 = Scheduler(max_batch=4, max_slots=2, max_len=64, prefix=cache)
    s2.add(_job("base", template[:8] + [5], None))
    s2.add(_job("no digest", template + [5], _adapter("gamma", "")))
    rows = s2.schedule().batch.rows
    assert [(r.job.request_id, r.cached) for r in rows] == [("no digest", 0), ("base", 7)]
    s3 = Scheduler(max_batch=4, max_slots=2, max_len=64, prefix=cache)
    for n in range(1, 14):  # every prompt length over the template: the prefill always feeds two tokens at least
        s3.add(_job(f"n{n}", template[:n], None))
    for row in s3.schedule().batch.rows:
        assert row.cached == 0 or len(row.job.prompt_ids) - row.cached >= 2


def _tokens_of(payloads):
    return [int(t) for p in payloads for t in p]
