"""Every error path returns its status code, and the server keeps serving after it."""

from __future__ import annotations

import grpc
import pytest

from tests.fixtures.serving import ENGINES, EngineBrake, ServerThread, serving_config, wait_until

TOKEN = "s3cret-token"


@pytest.fixture(scope="module", params=ENGINES)
def guarded(request, tiny_package, adapter_root, tmp_path_factory):
    """A server with auth on and the test adapter root, on each engine."""
    token_file = tmp_path_factory.mktemp("auth") / "token"
    token_file.write_text(TOKEN + "\n")
    handle = ServerThread(serving_config(tiny_package, engine=request.param, adapter_root=adapter_root,
                                         auth_token_file=token_file))
    yield handle
    handle.stop()


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        result = call()
        if hasattr(result, "__iter__") and not hasattr(result, "token_ids"):
            list(result)
    return err.value.code(), err.value.details()


def still_serving(server) -> None:
    with server.client() as client:
        assert len(client.generate("alpha", "The weather today", max_new_tokens=3).token_ids) == 3
        assert client.health() == "SERVING"


INVALID = [
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"max_new_tokens": 100000}, "max_new_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -3}, "top_k"),
    ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"stop": [""]}, "stop[0]"),
]


@pytest.mark.parametrize(("params", "field"), INVALID, ids=[f for _, f in INVALID])
def test_bad_sampling_parameter_is_invalid_argument_naming_the_field(server, params, field):
    with server.client() as client:
        code, details = code_of(lambda: client.generate("alpha", "hello", **params))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert field in details
        code, _ = code_of(lambda: client.stream("alpha", "hello", **params))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    still_serving(server)


def test_prompt_longer_than_the_context_is_invalid_argument(server):
    with server.client() as client:
        context = client.model_info().context_length
        code, details = code_of(lambda: client.generate("alpha", "word " * (context + 10)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "context length" in details and str(context) in details
    still_serving(server)


def test_request_input_errors_are_invalid_argument(server):
    from loraplex.v1 import generation_pb2

    with server.client() as client:
        empty = generation_pb2.GenerateRequest(adapter="alpha")
        code, details = code_of(lambda: client.generation.Generate(empty))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in details
        code, details = code_of(lambda: client.generate("alpha", inputs={"wrong": "x"}))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "text" in details
        code, details = code_of(lambda: client.generate("", inputs={"text": "x"}))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "template" in details
    still_serving(server)


def test_unknown_adapter_is_not_found_naming_the_loaded_ones(server):
    with server.client() as client:
        for call in (lambda: client.generate("missing", "hi"), lambda: client.stream("missing", "hi"),
                     lambda: client.tokenize("missing", "hi")):
            code, details = code_of(call)
            assert code == grpc.StatusCode.NOT_FOUND
            assert "alpha, beta, gamma" in details
    still_serving(server)


def test_admin_calls_need_the_bearer_token(guarded):
    from loraplex.runtime.client import Client

    for token in (None, "wrong"):
        with Client(guarded.target, token=token) as client:
            code, details = code_of(lambda c=client: c.load_adapter("delta", "beta.onnx_adapter"))
            assert code == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in details
            code, _ = code_of(lambda c=client: c.unload_adapter("alpha"))
            assert code == grpc.StatusCode.UNAUTHENTICATED
            assert [a.name for a in client.list_adapters()] == ["alpha", "beta", "gamma"]  # List is open
    with guarded.client(token=TOKEN) as client:
        assert client.load_adapter("delta", "beta.onnx_adapter").name == "delta"
        assert client.unload_adapter("delta").name == "delta"
    still_serving(guarded)


BAD_LOADS = [
    ("bad/name", "alpha.onnx_adapter", grpc.StatusCode.INVALID_ARGUMENT, "invalid"),
    ("..", "alpha.onnx_adapter", grpc.StatusCode.INVALID_ARGUMENT, "invalid"),
    ("x" * 65, "alpha.onnx_adapter", grpc.StatusCode.INVALID_ARGUMENT, "invalid"),
    ("delta", "../outside/alpha.onnx_adapter", grpc.StatusCode.PERMISSION_DENIED, "outside the adapter root"),
    ("delta", "/etc/passwd", grpc.StatusCode.PERMISSION_DENIED, "outside the adapter root"),
    ("delta", "escape.onnx_adapter", grpc.StatusCode.PERMISSION_DENIED, "symlink"),
    ("delta", "absent.onnx_adapter", grpc.StatusCode.NOT_FOUND, "no adapter file"),
    ("delta", "notes.txt", grpc.StatusCode.INVALID_ARGUMENT, ".onnx_adapter"),
    ("delta", "garbage.onnx_adapter", grpc.StatusCode.FAILED_PRECONDITION, "not an .onnx_adapter"),
    ("delta", "wrong_shape.onnx_adapter", grpc.StatusCode.FAILED_PRECONDITION, "graph expects"),
    ("alpha", "partial.onnx_adapter", grpc.StatusCode.FAILED_PRECONDITION, "lacks"),
]


@pytest.mark.parametrize(("name", "path", "code", "words"), BAD_LOADS, ids=[b[1] + ":" + b[0][:8] for b in BAD_LOADS])
def test_bad_load_fails_with_its_code_and_changes_nothing(guarded, name, path, code, words):
    with guarded.client(token=TOKEN) as client:
        before = [(a.name, a.version) for a in client.list_adapters()]
        got, details = code_of(lambda: client.load_adapter(name, path))
        assert got == code, details
        assert words in details
        assert [(a.name, a.version) for a in client.list_adapters()] == before
    still_serving(guarded)


def test_unload_unknown_adapter_is_not_found(guarded):
    with guarded.client(token=TOKEN) as client:
        code, _ = code_of(lambda: client.unload_adapter("missing"))
    assert code == grpc.StatusCode.NOT_FOUND


def test_full_queue_is_resource_exhausted_then_serves_again(server_factory):
    server = server_factory(max_batch=1, max_queue=1, metrics_port=None)
    with EngineBrake(server) as brake, server.client() as client:
        brake.hold()
        first = client.stream("alpha", "The weather today", max_new_tokens=4)
        queued = client.stream("beta", "The weather today", max_new_tokens=4)
        next(first), next(queued)  # both admitted: one decoding, one waiting
        wait_until(lambda: server.running.service.in_flight == 2, what="two requests in flight")
        code, details = code_of(lambda: client.generate("gamma", "hi", max_new_tokens=2))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_queue" in details
        brake.release()
        assert len([t for c in first for t in c.token_ids]) == 4
        assert len([t for c in queued for t in c.token_ids]) == 4
    still_serving(server)
