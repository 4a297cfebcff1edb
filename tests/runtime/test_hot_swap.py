"""Hot replacement and unload while requests are in flight: none lost, versions switch atomically."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from loraplex.adapters.package.manifest import Manifest

from tests.fixtures.reference import genai_reference, package_files
from tests.fixtures.serving import EngineBrake, wait_until


@pytest.fixture
def swap_server(server_factory, adapter_root):
    return server_factory(adapter_root=adapter_root, max_batch=4, max_queue=64, metrics_port=None)


def test_replacing_an_adapter_under_concurrent_load_loses_no_request_and_switches_version(swap_server,
                                                                                         recipe_package):
    manifest, files = Manifest.load(recipe_package), package_files(recipe_package)
    alpha = manifest.adapters["alpha"]
    prompt = "Review: the movie was great\nSentiment:"
    with swap_server.client() as client:
        ids = tuple(client.tokenize("alpha", prompt))
    want = {alpha.version: genai_reference(files.root, files.adapters["alpha"], ids, 8),
            "v2": genai_reference(files.root, files.adapters["beta"], ids, 8)}  # v2 = beta's weights
    assert want[alpha.version] != want["v2"]
    responses, errors = [], []
    stop = threading.Event()

    def hammer() -> None:
        with swap_server.client() as client:
            while not stop.is_set():
                try:
                    responses.append(client.generate("alpha", prompt, max_new_tokens=8))
                except grpc.RpcError as exc:  # any failure is a lost request
                    errors.append(exc)

    with EngineBrake(swap_server, delay=0.002), swap_server.client() as admin:
        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        wait_until(lambda: len(responses) >= 8, what="requests on the first version")
        wait_until(lambda: swap_server.running.service.in_flight >= 2, what="requests in flight at the swap")
        info = admin.load_adapter("alpha", "beta.onnx_adapter", version="v2")
        swapped_at = len(responses)
        wait_until(lambda: len(responses) >= swapped_at + 12, what="requests on the new version")
        stop.set()
        for t in threads:
            t.join()
        after = admin.generate("alpha", prompt, max_new_tokens=8)
        listed = {a.name: a for a in admin.list_adapters()}
    assert errors == []
    assert info.version == "v2" and info.template.prompt == alpha.template["prompt"]  # the task stays
    versions = [r.adapter_version for r in responses]
    assert set(versions) == {alpha.version, "v2"}
    first_new = versions.index("v2")
    assert all(v == "v2" for v in versions[first_new + 4 :])  # at most the 4 in flight finish on the old one
    for response in responses:  # each request was served entirely by the version it reports
        assert list(response.token_ids) == want[response.adapter_version]
    assert after.adapter_version == "v2"
    assert listed["alpha"].version == "v2" and listed["alpha"].in_flight == 0


def test_unload_waits_for_requests_in_flight_or_refuses_when_asked_not_to(swap_server):
    with EngineBrake(swap_server) as brake, swap_server.client() as client:
        brake.hold()
        stream = client.stream("gamma", "The weather today", max_new_tokens=6)
        next(stream)
        wait_until(lambda: swap_server.running.registry.get("gamma").leases == 1, what="gamma in use")
        with pytest.raises(grpc.RpcError) as err:
            client.unload_adapter("gamma", no_wait=True)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "in flight" in err.value.details()
        with ThreadPoolExecutor(1) as pool:
            unloading = pool.submit(client.unload_adapter, "gamma")
            wait_until(lambda: "gamma" not in swap_server.running.registry.names(), what="gamma removed")
            with pytest.raises(grpc.RpcError) as err:  # new requests no longer see it
                client.generate("gamma", "hi")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert not unloading.done()  # still waiting for the request in flight
            brake.release()
            tokens = [t for chunk in stream for t in chunk.token_ids]
            assert len(tokens) == 6  # the request in flight finished on its adapter
            assert unloading.result(60).requests_served >= 1
        assert [a.name for a in client.list_adapters()] == ["alpha", "beta"]
        client.load_adapter("gamma", "gamma.onnx_adapter")  # and it can come back
        assert client.generate("gamma", "hi", max_new_tokens=2).adapter == "gamma"
