"""The session cache's pages that loading read but decoding does not are dropped from the process
(`runtime.engines.batched.pages`): found as onnx finds them, gone after requests, tokens unchanged."""

from __future__ import annotations

import gc
import mmap
import shutil
import struct
import sys
from pathlib import Path

import pytest
from loraplex.runtime.engines.base import GenerationJob, SamplingParams
from loraplex.runtime.engines.batched import session
from loraplex.runtime.engines.batched.pages import (
    UNREAD_INPUTS,
    _graph,
    _mappings,
    _written,
    external_initializers,
    unread_only,
)
from loraplex.runtime.engines.batched.session import CACHE_SUFFIX
from loraplex.runtime.engines.heap import release_free_heap

from tests.fixtures.quantized import int4_copy
from tests.runtime.test_batched_engine import PROMPTS, Collected
from tests.runtime.test_session_cache import _tokens

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/pagemap is Linux's")


@pytest.fixture(scope="module")
def int4_package(recipe_package, tmp_path_factory) -> Path:
    return int4_copy(recipe_package, tmp_path_factory.mktemp("pages_int4") / "package")


@pytest.fixture
def cached_package(int4_package, tmp_path) -> Path:
    """A copy of the int4 package whose session cache exists (written by a first engine)."""
    out = tmp_path / "package"
    shutil.copytree(int4_package, out, ignore=shutil.ignore_patterns(f"*{CACHE_SUFFIX}*"))
    _run(out)
    assert list(out.glob(f"*{CACHE_SUFFIX}"))
    return out


def _run(root: Path, check=None) -> list[list[int]]:
    """Greedy tokens of a fresh engine on `root`, base then alpha; `check(engine)` before it closes."""
    return list(_tokens(root, check=check)[1:])


def _matmul_nbits_only(model: Path) -> set[str]:
    """The unread initializers only MatMulNBits nodes read (a gather's rows come back as requests read them)."""
    import onnx

    consumers: dict[str, set[str]] = {}
    for node in onnx.load(str(model), load_external_data=False).graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    return {name for name in unread_only(_graph(model.read_bytes())) if consumers.get(name) == {"MatMulNBits"}}


def _present_pages(model: Path, names: set[str]) -> tuple[int, int]:
    """(pages present, whole pages) of initializers `names` in this process's mappings of their data file."""
    page = mmap.PAGESIZE
    present = total = 0
    initializers = external_initializers(_graph(model.read_bytes()))
    with open("/proc/self/pagemap", "rb") as pagemap:
        for name in names & set(initializers):
            location, first, length = initializers[name]
            for start, end, offset in _mappings(model.parent / location):
                whole = range(-(-max(first, offset) // page), min(first + length, offset + end - start) // page)
                for file_page in whole:
                    pagemap.seek((start // page + file_page - offset // page) * 8)
                    present += struct.unpack("<Q", pagemap.read(8))[0] >> 63
                    total += 1
    return present, total


def test_the_graph_walk_reads_what_onnx_reads(cached_package):
    import onnx

    (cache,) = cached_package.glob(f"*{CACHE_SUFFIX}")
    model = onnx.load(str(cache), load_external_data=False)
    want = {}
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            want[tensor.name] = (info["location"], int(info.get("offset", 0)), int(info["length"]))
    graph = _graph(cache.read_bytes())
    assert external_initializers(graph) == want and want

    roles: dict[str, set[bool]] = {}
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            roles.setdefault(name, set()).add(index in UNREAD_INPUTS.get(node.op_type, ()))
    unread = {name for name, seen in roles.items() if seen == {True}}
    assert unread_only(graph) == unread
    assert any("scale" in name for name in unread & set(want))  # MatMulNBits scales are among them


def test_pages_decoding_does_not_read_leave_at_rest_and_stay_out_and_tokens_are_unchanged(cached_package,
                                                                                          monkeypatch):
    (cache,) = cached_package.glob(f"*{CACHE_SUFFIX}")
    matmul_only = _matmul_nbits_only(cache)
    unread = unread_only(_graph(cache.read_bytes()))
    seen = {}

    def look(engine):
        assert Path(engine.runner.session._model_path) == cache  # the session came from the cache
        seen["loaded"] = _present_pages(cache, matmul_only)
        release_free_heap()  # what the engine runs once idle
        seen["at rest"] = _present_pages(cache, unread)
        sink = Collected()  # decoding again reads none of the prepacked kernels' inputs
        engine.submit(GenerationJob(request_id="again", prompt_ids=PROMPTS[1], adapter=None, sink=sink,
                                    params=SamplingParams(max_new_tokens=8)))
        seen["again"] = sink.wait()
        seen["after a request"] = _present_pages(cache, matmul_only)

    dropped = _run(cached_package, look)
    assert seen["loaded"][0] > 0  # loading mapped them: what the drop saves
    present, total = seen["at rest"]
    assert total > seen["loaded"][1] and present == 0, f"{present} of {total} pages still mapped at rest"
    present, total = seen["after a request"]
    assert total > 0 and present == 0, f"{present} of {total} dropped pages came back with a request"
    dropped.append(seen["again"])

    monkeypatch.setattr(session, "_drop_unread_pages", lambda *args: None)  # the same engine without the drop
    # The first engine's session must be gone: while it lives, its idle drop (registered per session) also
    # drops the pages of this file that the second engine maps, which are the same file's.
    gc.collect()
    from loraplex.runtime.engines import heap

    assert not any(Path(owner._model_path) == cache for owner in list(heap._idle.keys()))
    kept = _run(cached_package, look)
    assert seen["after a request"][0] > 0
    assert dropped == [*kept, seen["again"]]


def test_a_page_written_in_a_private_file_mapping_counts_as_written(tmp_path):
    """The guard that keeps a copied-on-write page (which holds what the file does not) from being dropped."""
    import ctypes

    page = mmap.PAGESIZE
    path = tmp_path / "data"
    path.write_bytes(bytes(range(256)) * (4 * page // 256))
    with open(path, "rb") as f, open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
        mapping = mmap.mmap(f.fileno(), 4 * page, access=mmap.ACCESS_COPY)  # MAP_PRIVATE, writable
        address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
        assert mapping[0] == 0 and mapping[2 * page] == 0  # pages 0 and 2 read: file pages
        mapping[2 * page] = 7  # page 2 written: now an anonymous copy
        assert not _written(pagemap, address, 2 * page)
        assert _written(pagemap, address + 2 * page, page)
        assert _written(pagemap, address, 4 * page)
        assert any(start == address for start, _, _ in _mappings(path))
