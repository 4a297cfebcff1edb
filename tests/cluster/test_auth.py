"""Bearer tokens on the cluster's front end, as the single server checks them: guarded calls without the
token (or with another, or two) are UNAUTHENTICATED and reach neither the catalog nor a replica;
health stays open. The front is driven directly with stand-in handles: no Ray cluster is needed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from loraplex.runtime.errors import AdapterNotFound
from loraplex.v1 import adapters_pb2, generation_pb2

TOKEN = "s3cret-token"


class Context:
    """What the front reads and sets of Serve's gRPC context."""

    def __init__(self, metadata: list[tuple[str, str]]):
        self.metadata, self.code, self.details = metadata, None, ""

    def invocation_metadata(self):
        return self.metadata

    def set_code(self, code) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


class Remote:
    """A deployment method: `.remote(...)` records the call and answers `value`."""

    def __init__(self, value):
        self.value, self.calls = value, []

    def remote(self, *args):
        self.calls.append(args)
        future = asyncio.get_running_loop().create_future()
        future.set_result(self.value)
        return future


class Catalog:
    def __init__(self):
        self.load = Remote(AdapterNotFound("reached the catalog"))  # answered as a client's error would be
        self.status = Remote([])
        self.healthy = Remote(True)


class Engine:
    def options(self, **_):
        return self

    def __getattr__(self, name: str):
        raise AssertionError(f"a refused call reached a replica ({name})")


def front(package: Path, tmp_path: Path, scope: str):
    from loraplex.runtime.cluster.config import ClusterConfig
    from loraplex.runtime.cluster.front import ClusterFront
    from loraplex.runtime.server import ServerConfig

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    config = ClusterConfig(server=ServerConfig(package=package, auth_token_file=token_file, auth_scope=scope))
    catalog = Catalog()
    return ClusterFront(config, Engine(), catalog), catalog


CALLERS = {
    "none": [],
    "wrong": [("authorization", "Bearer nope")],
    "two": [("authorization", f"Bearer {TOKEN}"), ("authorization", f"Bearer {TOKEN}")],
}


@pytest.mark.parametrize("caller", sorted(CALLERS))
def test_admin_calls_without_the_token_are_refused_before_the_catalog(recipe_package, tmp_path, caller):
    cluster, catalog = front(recipe_package, tmp_path, "admin")
    context = Context(CALLERS[caller])
    request = adapters_pb2.LoadAdapterRequest(name="delta", path="beta.onnx_adapter")
    asyncio.run(cluster.Load(request, context))
    assert context.code == grpc.StatusCode.UNAUTHENTICATED and catalog.load.calls == []
    health = Context(CALLERS[caller])  # health stays open whatever the caller sends
    answer = asyncio.run(cluster.Check(health_pb2.HealthCheckRequest(service=""), health))
    assert health.code is None and answer.status == health_pb2.HealthCheckResponse.SERVING


def test_the_right_token_reaches_the_catalog(recipe_package, tmp_path):
    cluster, catalog = front(recipe_package, tmp_path, "admin")
    context = Context([("authorization", f"Bearer {TOKEN}")])
    asyncio.run(cluster.Load(adapters_pb2.LoadAdapterRequest(name="delta", path="beta.onnx_adapter"), context))
    assert catalog.load.calls == [("delta", "beta.onnx_adapter", "")]
    assert context.code == grpc.StatusCode.NOT_FOUND and "reached the catalog" in context.details


def test_scope_all_guards_generation_too(recipe_package, tmp_path):
    cluster, _ = front(recipe_package, tmp_path, "all")
    context = Context([])
    asyncio.run(cluster.Generate(generation_pb2.GenerateRequest(adapter="alpha", prompt="hi"), context))
    assert context.code == grpc.StatusCode.UNAUTHENTICATED
    admin_only, _ = front(recipe_package, tmp_path, "admin")
    listing = Context([])
    asyncio.run(admin_only.List(adapters_pb2.ListAdaptersRequest(), listing))  # List is not an admin call
    assert listing.code is None
