"""Health, reflection, metrics, cancellation and a loop that stays responsive during generation."""

from __future__ import annotations

import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.fixtures.serving import ENGINES, EngineBrake, reflected_services, wait_until


def metric(server, line_prefix: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.running.metrics_port}/metrics", timeout=10).read()
    for line in text.decode().splitlines():
        key, _, value = line.rpartition(" ")
        if key == line_prefix:
            return float(value)
    return 0.0


def test_health_answers_serving_for_the_server_and_each_service(server):
    with server.client() as client:
        for service in ("", "loraplex.v1.Generation", "loraplex.v1.Adapters"):
            assert client.health(service) == "SERVING"


def test_reflection_lists_the_services(server):
    names = reflected_services(server.target)
    assert {"loraplex.v1.Generation", "loraplex.v1.Adapters", "grpc.health.v1.Health"} <= names


def test_metrics_count_requests_and_tokens_by_adapter_and_status(server):
    requests_ok = 'loraplex_requests_total{adapter="beta",status="OK"}'
    tokens_ok = 'loraplex_completion_tokens_total{adapter="beta",status="OK"}'
    not_found = 'loraplex_requests_total{adapter="",status="NOT_FOUND"}'
    ttft, gaps = ('loraplex_time_to_first_token_seconds_count{adapter="beta"}',
                  'loraplex_inter_token_latency_seconds_count{adapter="beta"}')
    before = metric(server, requests_ok), metric(server, tokens_ok), metric(server, ttft), metric(server, gaps)
    with server.client() as client:
        for _ in range(3):
            client.generate("beta", "The weather today", max_new_tokens=5)
    assert metric(server, requests_ok) == before[0] + 3
    assert metric(server, tokens_ok) == before[1] + 15
    assert metric(server, "loraplex_loaded_adapters") == 3
    assert metric(server, ttft) == before[2] + 3  # one first token per request
    assert metric(server, gaps) == before[3] + 12  # 4 gaps between 5 tokens, per request
    assert metric(server, "loraplex_queue_depth") == 0
    assert metric(server, not_found) == 0  # an unknown adapter never gets a lease, so it is not counted per adapter


def test_cancelled_request_frees_its_slot(server_factory):
    server = server_factory(max_batch=1, max_queue=0)
    with EngineBrake(server) as brake, server.client() as client:
        brake.hold()
        stream = client.stream("alpha", "The weather today", max_new_tokens=400)
        next(stream)
        with pytest.raises(grpc.RpcError) as err:  # the only slot is taken
            client.generate("beta", "hi", max_new_tokens=2)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        stream.cancel()
        # The engine stays held until the server has seen the cancel: released earlier, it may finish
        # the 400 tokens first (the request then ends OK, not CANCELLED).
        cancelled = 'loraplex_requests_total{adapter="alpha",status="CANCELLED"}'
        wait_until(lambda: metric(server, cancelled) == 1, what="the server to see the cancel")
        brake.release()
        wait_until(lambda: server.running.service.in_flight == 0, what="the cancelled job to leave the engine")
        assert server.running.registry.get("alpha").leases == 0
        assert len(client.generate("beta", "hi", max_new_tokens=2).token_ids) == 2
    assert metric(server, cancelled) == 1


def test_deadline_stops_generation_and_frees_the_slot(server_factory):
    server = server_factory(max_batch=1, max_queue=0, metrics_port=None)
    with EngineBrake(server) as brake, server.client() as client:
        brake.hold()
        with pytest.raises(grpc.RpcError) as err:
            client.generate("alpha", "The weather today", max_new_tokens=400, timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        brake.release()
        wait_until(lambda: server.running.service.in_flight == 0, what="the expired job to leave the engine")
        assert len(client.generate("alpha", "hi", max_new_tokens=3).token_ids) == 3


def test_long_generation_does_not_block_health_or_admin_calls(server_factory, adapter_root):
    """Decoding runs off the asyncio loop: while a generation is mid-way (its engine thread held at a
    token until the test releases it), other RPCs are answered."""
    server = server_factory(adapter_root=adapter_root, metrics_port=None)
    with EngineBrake(server) as brake, server.client() as client:
        brake.hold()
        stream = client.stream("gamma", "The weather today", max_new_tokens=300)
        next(stream)  # admitted: its job is in the engine
        assert server.running.service.in_flight == 1
        with grpc.insecure_channel(server.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for _ in range(5):
                answer = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
                assert server.running.service.in_flight == 1  # answered while the generation is under way
        assert client.load_adapter("delta", "beta.onnx_adapter").name == "delta"
        assert [a.name for a in client.list_adapters()] == ["alpha", "beta", "delta", "gamma"]
        assert client.model_info().engine == server.running.config.engine
        assert server.running.service.in_flight == 1
        brake.release()
        tokens = [t for chunk in stream for t in chunk.token_ids]
    assert len(tokens) == 300


@pytest.mark.parametrize("engine", ENGINES)
def test_health_is_not_serving_until_the_model_is_loaded_and_warm(tiny_package, monkeypatch, engine):
    import threading

    from loraplex.runtime.client import Client
    from loraplex.runtime.server import loading as model_loading

    from tests.fixtures.serving import ServerThread, serving_config

    loading = threading.Event()
    build = model_loading.build_engine

    def slow_build(*args, **kwargs):
        loading.wait(60)  # the model "loads" until the test has looked
        return build(*args, **kwargs)

    monkeypatch.setattr(model_loading, "build_engine", slow_build)
    config = serving_config(tiny_package, engine=engine, port=_free_port(), metrics_port=None)
    holder: list[ServerThread] = []
    starting = threading.Thread(target=lambda: holder.append(ServerThread(config)))
    starting.start()
    try:
        with Client(f"127.0.0.1:{config.port}", timeout=10) as client:
            wait_until(lambda: _health_or_none(client) is not None, what="the port to open")
            assert client.health() == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as err:
                client.generate("alpha", "hi")
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in err.value.details()
            loading.set()
            starting.join(60)
            assert client.health() == "SERVING"
            assert len(client.generate("alpha", "hi", max_new_tokens=2).token_ids) == 2
    finally:
        loading.set()
        starting.join(60)
        for handle in holder:
            handle.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _health_or_none(client):
    try:
        return client.health()
    except grpc.RpcError:
        return None
