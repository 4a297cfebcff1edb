"""The batched engine's per-machine session cache: written at the first start, loaded (not rebuilt)
at the next, and made again when the package's graph changes; tokens stay exactly genai's."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from loraplex.adapters.package.adapter_file import read_adapter_file
from loraplex.adapters.package.reader import Package
from loraplex.runtime.engines.base import GenerationJob, SamplingParams
from loraplex.runtime.engines.batched import BatchedEngine
from loraplex.runtime.engines.batched.session import CACHE_SUFFIX

from tests.fixtures.reference import genai_reference, package_files
from tests.runtime.test_batched_engine import PROMPTS, Collected


@pytest.fixture
def package_copy(recipe_package, tmp_path) -> Path:
    out = tmp_path / "package"
    shutil.copytree(recipe_package, out, ignore=shutil.ignore_patterns(f"*{CACHE_SUFFIX}*"))
    return out


def _tokens(root: Path, session_cache: bool = True, check=None) -> tuple[str, list[int], list[int]]:
    """(the session's model file, base tokens, alpha tokens) from a fresh engine on `root`; `check(engine)`
    before it closes."""
    package = Package.open(root)
    engine = BatchedEngine(package, max_batch=2, intra_op_threads=1, session_cache=session_cache)
    try:
        alpha = engine.load_adapter("alpha", "1", read_adapter_file(package.adapter_path("alpha"), package.lora_inputs))
        out = []
        for handle in (None, alpha):
            sink = Collected()
            engine.submit(GenerationJob(request_id="r", prompt_ids=PROMPTS[0], adapter=handle, sink=sink,
                                        params=SamplingParams(max_new_tokens=8)))
            out.append(sink.wait())
        if check is not None:
            check(engine)
        return engine.runner.session._model_path, *out
    finally:
        engine.close()


def _caches(root: Path) -> list[Path]:
    return sorted(root.glob(f"*{CACHE_SUFFIX}"))


def test_second_start_loads_the_cache_and_a_changed_graph_makes_a_new_one(package_copy):
    files = package_files(package_copy)
    want = [genai_reference(files.root, None, tuple(PROMPTS[0]), 8),
            genai_reference(files.root, files.adapters["alpha"], tuple(PROMPTS[0]), 8)]
    first_model, *first = _tokens(package_copy)
    (cache,) = _caches(package_copy)
    assert Path(first_model).name.endswith(".batched.onnx") and first == want  # made, and ran, the ordinary way
    assert cache.with_name(cache.name + ".data").is_file()
    written = cache.stat().st_mtime_ns

    second_model, *second = _tokens(package_copy)
    assert Path(second_model) == cache and second == want  # loaded from the cache: same tokens
    assert cache.stat().st_mtime_ns == written  # not rewritten

    # The package's graph changes (re-export): the banked graph is rewritten, so the cache key changes.
    model = files.model
    os.utime(model, ns=(model.stat().st_atime_ns, model.stat().st_mtime_ns + 10**9))
    third_model, *third = _tokens(package_copy)
    (new_cache,) = _caches(package_copy)  # the stale one was removed
    assert new_cache != cache and Path(third_model).name.endswith(".batched.onnx") and third == want
    assert _tokens(package_copy)[0] == str(new_cache)


def test_no_cache_when_disabled_and_a_corrupt_cache_is_made_again(package_copy):
    assert _tokens(package_copy, session_cache=False)[0].endswith(".batched.onnx")
    assert not _caches(package_copy)
    _tokens(package_copy)
    (cache,) = _caches(package_copy)
    cache.write_bytes(b"not a model")
    model, *_ = _tokens(package_copy)
    assert not model.endswith(CACHE_SUFFIX)  # fell back to the ordinary session, which wrote it again
    assert cache.stat().st_size > 100
