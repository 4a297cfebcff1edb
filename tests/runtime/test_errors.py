"""Every error path returns its status code, and the server keeps serving after it."""

from __future__ import annotations

import grpc
import pytest
from loraplex.v1 import adapters_pb2

from tests.fixtures.serving import ENGINES, EngineBrake, ServerThread, serving_config, wait_until

TOKEN = "s3cret-token"


@pytest.fixture(scope="module", params=ENGINES)
def guarded(request, recipe_package, adapter_root, tmp_path_factory):
    """A server with auth on and the test adapter root, on each engine."""
    token_file = tmp_path_factory.mktemp("auth") / "token"
    token_file.write_text(TOKEN + "\n")
    handle = ServerThread(serving_config(recipe_package, engine=request.param, adapter_root=adapter_root,
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
        load = adapters_pb2.LoadAdapterRequest(name="delta", path="beta.onnx_adapter")
        good = ("authorization", f"Bearer {TOKEN}")
        for twice in ([("authorization", "Bearer wrong"), good], [good, good]):  # the last value used to win
            code, details = code_of(lambda m=twice: client.adapters.Load(load, metadata=m, timeout=30))
            assert code == grpc.StatusCode.UNAUTHENTICATED and "more than one" in details
        assert "delta" not in [a.name for a in client.list_adapters()]
        assert client.load_adapter("delta", "beta.onnx_adapter").name == "delta"
        assert client.unload_adapter("delta").name == "delta"
    still_serving(guarded)


INVALID, DENIED, MISSING, REFUSED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED,
                                     grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)
BAD_LOADS = {  # id: (name, path, status, words in the details)
    "name-slash": ("bad/name", "alpha.onnx_adapter", INVALID, "invalid"),
    "name-dotdot": ("..", "alpha.onnx_adapter", INVALID, "invalid"),
    "name-65": ("x" * 65, "alpha.onnx_adapter", INVALID, "invalid"),
    "name-100000": ("a" * 100_000, "alpha.onnx_adapter", INVALID, "invalid"),  # no metadata overflow
    "name-newline": ("spare\n", "alpha.onnx_adapter", INVALID, "invalid"),  # a full match, not a prefix
    "name-nul": ("spare\0", "alpha.onnx_adapter", INVALID, "invalid"),
    "traversal": ("delta", "../outside/alpha.onnx_adapter", DENIED, "outside the adapter root"),
    "absolute": ("delta", "/etc/passwd", DENIED, "outside the adapter root"),
    "symlink-out": ("delta", "escape.onnx_adapter", DENIED, "symlink"),
    "absent": ("delta", "absent.onnx_adapter", MISSING, "no adapter file"),
    "absent-outside": ("delta", "../nowhere/x.onnx_adapter", DENIED, "outside the adapter root"),
    "not-adapter": ("delta", "notes.txt", INVALID, ".onnx_adapter"),
    # every path error has its status, decided before the filesystem is asked
    "path-nul": ("delta", "al\0pha.onnx_adapter", INVALID, "NUL"),
    "path-300-char-name": ("delta", "a" * 300 + ".onnx_adapter", INVALID, "at most 255"),
    "path-6000": ("delta", "a/" * 3000 + "x.onnx_adapter", INVALID, "at most 1024"),
    "path-60000": ("delta", "b" * 60_000, INVALID, "at most 1024"),
    "symlink-loop": ("delta", "loop_a/x.onnx_adapter", INVALID, "symlink loop"),
    "directory": ("delta", "loop_a", INVALID, "symlink loop"),
    # the file's bytes: recorded sha256 first, then the graph checks
    "garbage": ("delta", "garbage.onnx_adapter", REFUSED, "not an .onnx_adapter"),
    "wrong-shape": ("delta", "wrong_shape.onnx_adapter", REFUSED, "graph expects"),
    "partial": ("alpha", "partial.onnx_adapter", REFUSED, "lacks"),
    "nan": ("delta", "nan.onnx_adapter", REFUSED, "NaN"),
    "huge": ("delta", "huge.onnx_adapter", REFUSED, "magnitude"),
    "float16": ("delta", "half.onnx_adapter", REFUSED, "float16"),
    "int32": ("delta", "ints.onnx_adapter", REFUSED, "int32"),
    "flipped-bytes": ("delta", "flipped.onnx_adapter", REFUSED, "does not match the sha256"),  # defect 8
    "unrecorded": ("delta", "unrecorded.onnx_adapter", REFUSED, "no recorded sha256"),
    "bad-sidecar": ("delta", "badsum.onnx_adapter", REFUSED, "64 hex digits"),
}
TENSOR_FAULTS = ("nan", "huge", "float16", "int32", "wrong-shape")


@pytest.mark.parametrize("case", list(BAD_LOADS))
def test_bad_load_fails_with_its_code_and_changes_nothing(guarded, case):
    name, path, code, words = BAD_LOADS[case]
    with guarded.client(token=TOKEN) as client:
        before = [(a.name, a.version) for a in client.list_adapters()]
        got, details = code_of(lambda: client.load_adapter(name, path))
        assert got == code, details
        assert words in details
        assert len(details) < 1200  # user input is quoted, not echoed whole
        if case in TENSOR_FAULTS:
            assert ".MatMul.weight" in details  # names the tensor at fault
        assert [(a.name, a.version) for a in client.list_adapters()] == before
    still_serving(guarded)


def test_a_valid_file_with_its_recorded_sha256_loads(guarded):
    with guarded.client(token=TOKEN) as client:
        info = client.load_adapter("delta", "alpha_half.onnx_adapter")
        assert len(info.sha256) == 64 and info.version == info.sha256[:12]
        assert len(client.generate("delta", "The weather today", max_new_tokens=3).token_ids) == 3
        client.unload_adapter("delta")


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
