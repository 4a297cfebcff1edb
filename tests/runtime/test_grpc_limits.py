"""gRPC's 4 MiB message limit, on both engines: a request message over it is RESOURCE_EXHAUSTED
(README, status table) on every call, one of exactly 4 MiB still reaches the request path, and the
server keeps serving."""

from __future__ import annotations

import grpc
import pytest
from loraplex.runtime.client import generate_request
from loraplex.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc

LIMIT = 4 * 1024 * 1024


def code_of(call, request) -> tuple[grpc.StatusCode, str]:
    """The status `call(request)` ends with (it must fail)."""
    with pytest.raises(grpc.RpcError) as err:
        call(request)
    return err.value.code(), err.value.details()


def still_serving(server) -> None:
    with server.client() as client:
        assert len(client.generate("alpha", "The weather today", max_new_tokens=3, ignore_eos=True).token_ids) == 3
        assert client.health() == "SERVING"


def sized(message, field: str, size: int):
    """`message` with its text `field` padded so that the message serializes to exactly `size` bytes."""
    setattr(message, field, "")
    pad = size - message.ByteSize()
    while True:  # the length prefix grows with the text: shrink the text until the whole fits
        setattr(message, field, "x" * pad)
        over = message.ByteSize() - size
        if over <= 0:
            break
        pad -= over
    assert message.ByteSize() == size, message.ByteSize()
    return message


def calls(channel: grpc.Channel):
    """(name, request field, call(request)) for every call whose request carries free text."""
    generation = generation_pb2_grpc.GenerationStub(channel)
    adapters = adapters_pb2_grpc.AdaptersStub(channel)
    return [
        ("Generate", lambda: generate_request("alpha", "", max_new_tokens=2), "prompt",
         lambda r: generation.Generate(r, timeout=60)),
        ("GenerateStream", lambda: generate_request("alpha", "", max_new_tokens=2), "prompt",
         lambda r: list(generation.GenerateStream(r, timeout=60))),
        ("Tokenize", lambda: generation_pb2.TokenizeRequest(adapter="alpha"), "prompt",
         lambda r: generation.Tokenize(r, timeout=60)),
        ("Load", lambda: adapters_pb2.LoadAdapterRequest(name="delta"), "path", lambda r: adapters.Load(r, timeout=60)),
    ]


def test_a_message_over_4_mib_is_resource_exhausted_on_every_call(server):
    with grpc.insecure_channel(server.target) as channel:
        for name, request, field, call in calls(channel):
            code, details = code_of(call, sized(request(), field, LIMIT + 1))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (name, code, details)
            assert f"{LIMIT + 1} vs. {LIMIT}" in details, (name, details)
    still_serving(server)


@pytest.mark.parametrize("name", ["Generate", "GenerateStream", "Tokenize", "Load"])
def test_a_message_of_exactly_4_mib_reaches_the_request_path(server, name):
    """At the limit the message is decoded and judged by the request path: a prompt that long is over
    --max-prompt-bytes, a path that long is over 1024 characters (INVALID_ARGUMENT, not the transport's
    RESOURCE_EXHAUSTED)."""
    with grpc.insecure_channel(server.target) as channel:
        _, request, field, call = next(c for c in calls(channel) if c[0] == name)
        code, details = code_of(call, sized(request(), field, LIMIT))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert ("--max-prompt-bytes" if field == "prompt" else "1024") in details, details
    still_serving(server)


def test_a_port_in_use_fails_the_start_with_a_clear_error(recipe_package):
    """grpcio raises RuntimeError("Failed to bind ...") for a port in use: the start says which port."""
    import asyncio
    import socket

    from loraplex.runtime.server import ServerConfig, start_server

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = ServerConfig(package=recipe_package, port=port, warmup=False)
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port} \\(port in use\\?\\)"):
            asyncio.run(start_server(config))


@pytest.mark.parametrize("engine", ["batched", "genai"])
def test_a_start_that_fails_while_the_model_loads_closes_the_engine(recipe_package, engine):
    """The model loads while the ports open: a start that then fails (here its HTTP port is in use) waits
    for the engine and closes it (its thread ends) before raising."""
    import asyncio
    import socket
    import threading

    from loraplex.runtime.server import ServerConfig, start_server

    before = set(threading.enumerate())  # other tests' servers may be running
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = ServerConfig(package=recipe_package, port=0, http_port=taken.getsockname()[1], engine=engine,
                              warmup=False)
        with pytest.raises(OSError):
            asyncio.run(start_server(config))
    left = [t.name for t in threading.enumerate() if t not in before and t.name in ("loraplex-batched", "genai-engine")]
    assert not left, f"the start that failed left its engine running: {left}"
