"""The batched engine's prefix cache end to end: greedy tokens equal a cache-off engine's token for
token (rows from a cached prefix batched with rows that are not, mixed adapters; fp32 and int4), the
KV of a template is reused by the next request of the template, and an unloaded adapter's prefixes go.

The int4 package: `tests.fixtures.quantized.int4_copy` of the recipe package."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from loraplex.adapters.package.adapter_file import read_adapter_file
from loraplex.adapters.package.reader import Package
from loraplex.runtime.engines.base import GenerationJob, SamplingParams, StepOutput
from loraplex.runtime.engines.batched import BatchedEngine
from loraplex.runtime.engines.batched.prefix_cache import DEFAULT_BLOCK_TOKENS

from tests.fixtures.quantized import int4_copy

WAIT_S = 120
MIB = 1 << 20


class Sink:
    def __init__(self):
        self.tokens: list[int] = []
        self.done = threading.Event()

    def on_output(self, output: StepOutput) -> None:
        self.tokens.extend(output.tokens)
        if output.finish is not None:
            self.done.set()

    def wait(self) -> list[int]:
        assert self.done.wait(WAIT_S), "job did not finish"
        return self.tokens


@pytest.fixture(scope="module", params=["fp32", "int4"])
def package_dir(request, recipe_package, tmp_path_factory) -> Path:
    if request.param == "fp32":
        return recipe_package
    return int4_copy(recipe_package, tmp_path_factory.mktemp("recipe_int4") / "package")


def load(engine: BatchedEngine, root, name: str, version: str = "1"):
    package = Package.open(root)
    return engine.load_adapter(name, version, read_adapter_file(package.adapter_path(name), package.lora_inputs))


@pytest.fixture(scope="module")
def engines(package_dir):
    """(cache on, cache off), each with alpha and beta loaded."""
    made = []
    for size in (8 * MIB, 0):
        engine = BatchedEngine(Package.open(package_dir), intra_op_threads=2, max_batch=8, max_slots=3,
                               prefix_cache_bytes=size)
        made.append((engine, {name: load(engine, package_dir, name) for name in ("alpha", "beta")}))
    yield made
    for engine, _ in made:
        engine.close()


def run(engine, handles, requests, max_new_tokens=12) -> list[list[int]]:
    """Submit every (adapter name or None, prompt) at once (they share the batch); their tokens."""
    sinks = []
    for name, prompt in requests:
        sink = Sink()
        engine.submit(GenerationJob(f"r{id(sink)}", list(prompt), SamplingParams(max_new_tokens=max_new_tokens,
                                                                                  ignore_eos=True),
                                    handles.get(name) if name else None, sink))
        sinks.append(sink)
    return [sink.wait() for sink in sinks]


def _template(seed: int, n: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, 2000, n)]


def test_greedy_tokens_equal_the_cache_off_engine_with_mixed_adapters_and_rows_that_hit_beside_rows_that_miss(
        engines):
    (on, on_handles), (off, off_handles) = engines
    template = _template(1, 2 * DEFAULT_BLOCK_TOKENS + 5)
    first = [(name, template + _template(10 + i, 3 + i)) for i, name in enumerate((None, "alpha", "beta"))]
    assert run(on, on_handles, first) == run(off, off_handles, first)
    stats = on.prefix_cache.stats
    assert stats.tokens_reused == 0 and on.prefix_cache.bytes > 0
    # Same template, other fields (alpha's first prompt now sent to beta); a new template beside them.
    second = [(name, template + _template(20 + i, 4 + 2 * i)) for i, name in enumerate((None, "alpha", "beta"))]
    second += [("alpha", _template(2, 40)), ("beta", first[1][1])]
    reused, hits = stats.tokens_reused, stats.hits
    got = run(on, on_handles, second)
    assert got == run(off, off_handles, second)
    assert stats.hits - hits == 4  # not the new template
    assert stats.tokens_reused - reused == 4 * 2 * DEFAULT_BLOCK_TOKENS  # the template's two blocks each


def test_a_whole_prompt_cached_recomputes_its_last_two_tokens_and_the_tokens_stay_equal(engines):
    (on, on_handles), (off, off_handles) = engines
    prompt = _template(3, 3 * DEFAULT_BLOCK_TOKENS)  # exactly three blocks
    want = run(off, off_handles, [("beta", prompt)])
    assert run(on, on_handles, [("beta", prompt)]) == want
    reused = on.prefix_cache.stats.tokens_reused
    assert run(on, on_handles, [("beta", prompt)]) == want
    assert on.prefix_cache.stats.tokens_reused - reused == len(prompt) - 2


def test_unloading_an_adapter_drops_its_prefixes_and_only_its(recipe_package):
    package = Package.open(recipe_package)
    engine = BatchedEngine(package, intra_op_threads=2, max_batch=4, max_slots=2, prefix_cache_bytes=8 * MIB)
    try:
        handles = {name: load(engine, recipe_package, name) for name in ("alpha", "beta")}
        prompt = _template(4, 2 * DEFAULT_BLOCK_TOKENS + 2)
        run(engine, handles, [("alpha", prompt), ("beta", prompt), (None, prompt)], max_new_tokens=2)
        cache = engine.prefix_cache
        assert len(cache) == 6 and cache.stats.dropped_blocks == 0
        engine.unload_adapter(handles["alpha"])
        assert len(cache) == 4 and cache.stats.dropped_blocks == 2
        reused = cache.stats.tokens_reused
        run(engine, handles, [("beta", prompt), (None, prompt)], max_new_tokens=2)
        assert cache.stats.tokens_reused - reused == 2 * 2 * DEFAULT_BLOCK_TOKENS  # theirs are still there
    finally:
        engine.close()


def test_the_byte_bound_holds_and_the_least_recently_used_prefix_goes_first(recipe_package):
    package = Package.open(recipe_package)
    config = package.config
    block_bytes = 2 * config.num_layers * config.num_kv_heads * DEFAULT_BLOCK_TOKENS * config.head_size * 4
    engine = BatchedEngine(package, intra_op_threads=2, max_batch=2, max_slots=2, prefix_cache_bytes=4 * block_bytes)
    try:
        cache = engine.prefix_cache
        a, b, c = (_template(seed, 2 * DEFAULT_BLOCK_TOKENS + 2) for seed in (5, 6, 7))
        for prompt in (a, b):
            run(engine, {}, [(None, prompt)], max_new_tokens=1)
        assert cache.bytes == 4 * block_bytes
        run(engine, {}, [(None, a)], max_new_tokens=1)  # a is now the most recently used
        run(engine, {}, [(None, c)], max_new_tokens=1)  # c takes b's place
        assert cache.bytes <= 4 * block_bytes and cache.stats.evicted_blocks == 2
        reused = cache.stats.tokens_reused
        run(engine, {}, [(None, a)], max_new_tokens=1)
        assert cache.stats.tokens_reused - reused == 2 * DEFAULT_BLOCK_TOKENS
        run(engine, {}, [(None, b)], max_new_tokens=1)
        assert cache.stats.tokens_reused - reused == 2 * DEFAULT_BLOCK_TOKENS  # b was evicted: no reuse
    finally:
        engine.close()


def test_a_server_read_adapter_is_namespaced_by_its_verified_file_sha256(recipe_package, tmp_path):
    """The server reads and verifies an adapter file's sha256; the engine keys the adapter's prefixes by it
    instead of hashing the tensors again (a file read another way is keyed by its tensors' digest)."""
    from loraplex.adapters.package.manifest import file_sha256
    from loraplex.runtime.engines.batched.prefix_cache import weights_digest
    from loraplex.runtime.server.adapter_files import AdapterFiles

    package = Package.open(recipe_package)
    path = package.adapter_path("alpha")
    _, checked = AdapterFiles(package, path.parent).read("alpha", path)
    assert checked.sha256 == file_sha256(path)
    engine = BatchedEngine(package, intra_op_threads=2, max_batch=2, max_slots=2, prefix_cache_bytes=MIB)
    try:
        assert engine.load_adapter("alpha", "1", checked).digest == checked.sha256
        plain = read_adapter_file(path, package.lora_inputs)
        assert engine.load_adapter("alpha", "2", plain).digest == weights_digest(plain.tensors)
    finally:
        engine.close()
