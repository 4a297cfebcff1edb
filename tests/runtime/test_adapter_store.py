"""Adapter stores: an adapter named in a request and not loaded is resolved in the stores on first use,
checked as a Load is; a missing or bad entry fails only its own requests; concurrent first requests
resolve it once. On both engines, over gRPC and in process."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from loraplex.runtime.server.adapter_store import DirectoryStore, StoredAdapter

from tests.fixtures.reference import genai_reference
from tests.fixtures.serving import wait_until

PROMPT = "Review: the movie was great\nSentiment:"


class GatedStore:
    """A directory store whose `fetch` waits for `gate` and counts its calls."""

    def __init__(self, root: Path):
        self.inner = DirectoryStore(root)
        self.description = "gated " + self.inner.description
        self.gate = threading.Event()
        self.fetches: list[str] = []

    def names(self) -> list[str]:
        return self.inner.names()

    def fetch(self, name: str) -> StoredAdapter | None:
        self.fetches.append(name)
        self.gate.wait(60)
        return self.inner.fetch(name)


@pytest.fixture
def store_server(server_factory, adapter_root):
    return server_factory(adapter_stores=[adapter_root], metrics_port=None)


def test_an_unknown_adapter_is_resolved_in_the_store_on_first_use(store_server, recipe_package, adapter_root):
    with store_server.client() as client:
        assert "alpha_half" not in [a.name for a in client.list_adapters()]
        ids = tuple(client.tokenize("alpha", PROMPT))
        reply = client.generate("alpha_half", PROMPT, max_new_tokens=8)
        assert reply.adapter == "alpha_half"
        assert list(reply.token_ids) == genai_reference(recipe_package, adapter_root / "alpha_half.onnx_adapter",
                                                        ids, 8)
        again = client.generate("alpha_half", PROMPT, max_new_tokens=8)
        listed = {a.name: a for a in client.list_adapters()}
    assert list(again.token_ids) == list(reply.token_ids)
    assert listed["alpha_half"].requests_served == 2 and listed["alpha_half"].sha256
    assert store_server.running.registry.resolved == 1


@pytest.mark.parametrize(("name", "code", "words"), [
    ("absent", grpc.StatusCode.NOT_FOUND, "no adapter store holds it"),
    ("flipped", grpc.StatusCode.FAILED_PRECONDITION, "does not match the sha256"),
    ("unrecorded", grpc.StatusCode.FAILED_PRECONDITION, "no recorded sha256"),
    ("wrong_shape", grpc.StatusCode.FAILED_PRECONDITION, "does not fit"),
    ("nan", grpc.StatusCode.FAILED_PRECONDITION, "does not fit"),
    ("garbage", grpc.StatusCode.FAILED_PRECONDITION, "does not fit"),
    ("escape", grpc.StatusCode.FAILED_PRECONDITION, "links outside"),
    ("bad/name", grpc.StatusCode.NOT_FOUND, "is not loaded"),
])
def test_a_missing_or_bad_store_entry_fails_only_its_request(store_server, name, code, words):
    registry = store_server.running.registry
    before = registry.names()
    with store_server.client() as client:
        stream = client.stream("alpha", PROMPT, max_new_tokens=6)  # a request on another adapter meanwhile
        with pytest.raises(grpc.RpcError) as err:
            client.generate(name, PROMPT, max_new_tokens=4)
        assert err.value.code() == code and words in err.value.details(), err.value.details()
        assert len([t for chunk in stream for t in chunk.token_ids]) == 6
        assert client.generate("beta", PROMPT, max_new_tokens=2).adapter == "beta"
    assert registry.names() == before


def test_concurrent_first_requests_resolve_an_adapter_once(server_factory, adapter_root):
    store = GatedStore(adapter_root)
    server = server_factory(adapter_stores=[store], metrics_port=None, max_batch=4)
    registry = server.running.registry
    entered = []
    lease = registry.lease

    async def counting_lease(name):
        entered.append(name)
        return await lease(name)

    registry.lease = counting_lease
    with ThreadPoolExecutor(4) as pool, server.client() as client:
        replies = [pool.submit(client.generate, "alpha_half", PROMPT, max_new_tokens=4) for _ in range(4)]
        wait_until(lambda: entered.count("alpha_half") == 4 and store.fetches, what="four first requests waiting")
        store.gate.set()
        tokens = {tuple(r.result(60).token_ids) for r in replies}
    assert store.fetches == ["alpha_half"] and registry.resolved == 1 and len(tokens) == 1


def test_the_in_process_api_resolves_from_its_stores(recipe_package, adapter_root):
    from loraplex.runtime.api import LLM

    with LLM(recipe_package, engine="batched", adapter_stores=[adapter_root], max_batch=2) as llm:
        reply = llm.generate(PROMPT, adapter="alpha_half", max_new_tokens=4)
    assert reply.adapter == "alpha_half" and len(reply.token_ids) == 4


def test_http_requests_resolve_store_adapters_too(server_factory, adapter_root):
    import json
    import urllib.error
    import urllib.request

    server = server_factory(adapter_stores=[adapter_root], metrics_port=None, http_port=0)
    url = server.running.http.url

    def post(model: str):
        body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": 3}).encode()
        request = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.load(response)

    with pytest.raises(urllib.error.HTTPError) as err:  # a card is served for loaded adapters only
        urllib.request.urlopen(f"{url}/v1/models/alpha_half", timeout=30)
    assert err.value.code == 404
    assert post("alpha_half")["model"] == "alpha_half"
    with urllib.request.urlopen(f"{url}/v1/models/alpha_half", timeout=30) as response:
        assert json.load(response)["id"] == "alpha_half"
    for model, status in (("absent", 404), ("flipped", 400)):
        with pytest.raises(urllib.error.HTTPError) as err:
            post(model)
        assert err.value.code == status, model


def test_a_store_of_another_base_models_package_is_refused(server_factory, recipe_package, tmp_path):
    import json
    import shutil

    from tests.fixtures.serving import record_digest

    other = tmp_path / "other"
    (other / "adapters").mkdir(parents=True)
    manifest = json.loads((recipe_package / "manifest.json").read_text())
    manifest["base"]["sha256"] = "0" * 64  # a package of another base model
    (other / "manifest.json").write_text(json.dumps(manifest))
    shutil.copy(recipe_package / "adapters" / "alpha.onnx_adapter", other / "adapters" / "delta.onnx_adapter")
    record_digest(other / "adapters" / "delta.onnx_adapter")
    server = server_factory(adapter_stores=[other / "adapters"], metrics_port=None)
    with server.client() as client:
        with pytest.raises(grpc.RpcError) as err:
            client.generate("delta", PROMPT, max_new_tokens=2)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "another base model" in err.value.details()
        assert client.generate("alpha", PROMPT, max_new_tokens=2).adapter == "alpha"
