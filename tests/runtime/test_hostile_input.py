"""What a hostile client found, each as a regression test on both engines.

Every input gets a documented status, the message quotes at most ~200 characters of it, and the
server keeps serving (and answering health checks) whatever a client sends.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from loraplex.v1 import adapters_pb2, generation_pb2

from tests.fixtures.serving import EngineBrake, wait_until
from tests.runtime.test_errors import code_of, still_serving

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(("params", "field", "accepted"), [
    ({"temperature": 1.0, "repetition_penalty": 1e-40}, "repetition_penalty", "[0.01, 100]"),  # defect 1
    ({"repetition_penalty": 0.001}, "repetition_penalty", "[0.01, 100]"),
    ({"repetition_penalty": 1e30}, "repetition_penalty", "[0.01, 100]"),
    ({"temperature": 1e-30}, "temperature", "[0.01, 100]"),
    ({"temperature": 1e30}, "temperature", "[0.01, 100]"),
    ({"top_p": float("inf")}, "top_p", "(0, 1]"),
], ids=["penalty-1e-40", "penalty-0.001", "penalty-1e30", "temperature-1e-30", "temperature-1e30", "top_p-inf"])
def test_parameters_that_would_make_scores_non_finite_are_refused_naming_the_range(server, params, field, accepted):
    with server.client() as client:
        code, details = code_of(lambda: client.generate("alpha", "hello", **params))
    assert code == INVALID and f"params.{field}" in details and accepted in details
    still_serving(server)


def test_the_edges_of_the_accepted_ranges_decode(server):
    with server.client() as client:
        for params in ({"temperature": 0.01, "repetition_penalty": 0.01, "seed": 1},
                       {"temperature": 100.0, "repetition_penalty": 100.0, "seed": 1}):
            response = client.generate("beta", "The weather", max_new_tokens=4, ignore_eos=True, **params)
            assert len(response.token_ids) == 4


@pytest.mark.parametrize(("request_kwargs", "field"), [
    ({"inputs": {"text": "the movie was awful\0"}}, "inputs.fields['text']"),  # defect 6
    ({"prompt": "The weather\0 today"}, "prompt"),
    ({"prompt": "hi", "stop": ["a\0"]}, "params.stop[0]"),
    ({"inputs": {"te\0xt": "x"}}, "field name"),
], ids=["inputs", "prompt", "stop", "field-name"])
def test_nul_in_text_is_invalid_argument_never_a_silent_cut(server, request_kwargs, field):
    with server.client() as client:
        code, details = code_of(lambda: client.generate("alpha", **request_kwargs))
        assert code == INVALID and "NUL" in details and field in details
        code, _ = code_of(lambda: client.stream("alpha", **request_kwargs))
        assert code == INVALID
        if "stop" not in request_kwargs:
            prompt, inputs = request_kwargs.get("prompt"), request_kwargs.get("inputs")
            code, _ = code_of(lambda: client.tokenize("alpha", prompt, inputs))
            assert code == INVALID
        code, details = code_of(lambda: client.generate("al\0pha", "hi"))
        assert code == INVALID and "adapter" in details
    still_serving(server)


@pytest.mark.parametrize("length", [10_000, 20_000, 200_000])
def test_an_overlong_adapter_name_is_not_found_with_its_name_quoted_short(server, length):
    """Defect 4: the name used to be echoed whole, so the trailers overflowed (RESOURCE_EXHAUSTED)."""
    with server.client() as client:
        for call in (lambda: client.generate("a" * length, "hi"), lambda: client.stream("a" * length, "hi"),
                     lambda: client.tokenize("é" * length, "hi")):
            code, details = code_of(call)
            assert code == grpc.StatusCode.NOT_FOUND, details
            assert f"({length} characters)" in details and len(details) < 600
        code, details = code_of(lambda: client.unload_adapter("😀" * length))
        assert code == grpc.StatusCode.NOT_FOUND and len(details.encode()) < 2048


RAW = {
    "utf8": b"\x0a\x03\xff\xfe\xfd",  # field 1 (adapter) holding invalid UTF-8
    "truncated": b"\x12\xff\x01abc",  # a length prefix longer than the message
    "random": bytes(range(256)) * 3,
}
METHODS = ["/loraplex.v1.Generation/Generate", "/loraplex.v1.Generation/GenerateStream",
           "/loraplex.v1.Generation/Tokenize", "/loraplex.v1.Adapters/Load", "/grpc.health.v1.Health/Check"]


def test_undecodable_request_bytes_are_invalid_argument_with_one_log_line(server, caplog):
    """Defect 3: grpcio's deserializer raised, the client saw UNKNOWN and the log a traceback."""
    caplog.set_level(logging.WARNING)
    codes = []
    with grpc.insecure_channel(server.target) as channel:
        for method in METHODS:
            for name, payload in RAW.items():
                if method.endswith("Stream"):
                    call = channel.unary_stream(method)
                    code, details = code_of(lambda c=call, p=payload: list(c(p, timeout=10)))
                else:
                    call = channel.unary_unary(method)
                    code, details = code_of(lambda c=call, p=payload: c(p, timeout=10))
                codes.append(code)
                assert code == INVALID, (method, name, details)
                assert "not a valid" in details
        reflect = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
        code, _ = code_of(lambda: list(reflect(iter([RAW["truncated"]]), timeout=10)))
        assert code == INVALID
    refused = [r for r in caplog.records if "do not decode" in r.getMessage()]
    assert len(refused) == len(codes) + 1  # one line per refused call
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not [r for r in refused if r.exc_info]
    still_serving(server)


def test_huge_prompts_are_refused_before_tokenizing_and_health_keeps_answering(server):
    """Defect 8: four concurrent 3.45 MB prompts used to stall health checks for most of a second."""
    huge = "the weather today " * 200_000  # 3.6 MB, under gRPC's 4 MiB message limit
    with server.client(timeout=60) as client, ThreadPoolExecutor(4) as pool:
        calls = [pool.submit(code_of, lambda: client.generate("alpha", huge)) for _ in range(2)]
        calls += [pool.submit(code_of, lambda: client.generate("alpha", inputs={"text": huge})) for _ in range(2)]
        while not all(c.done() for c in calls):
            assert client.health() == "SERVING"
        for call in calls:
            code, details = call.result()
            assert code == INVALID and "bytes" in details and "--max-prompt-bytes" in details
    still_serving(server)


class HeldTokenizer:
    """The server's tokenizer, held at prompts containing HOLD until released."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.entered = threading.Event()
        self.release = threading.Event()

    def encode(self, text: str) -> list[int]:
        if "HOLD" in text:
            self.entered.set()
            assert self.release.wait(60)
        return self._tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids)


def test_tokenizing_runs_off_the_event_loop(server_factory):
    server = server_factory(metrics_port=None)
    service = server.running.service
    held = HeldTokenizer(service.tokenizer)
    service.tokenizer = held
    with server.client() as client, ThreadPoolExecutor(1) as pool:
        slow = pool.submit(client.generate, "alpha", "HOLD the weather", max_new_tokens=2)
        assert held.entered.wait(30)
        assert client.health() == "SERVING"  # the loop answers while a prompt is being tokenized
        assert len(client.generate("beta", "The weather", max_new_tokens=3).token_ids) == 3
        held.release.set()
        assert len(slow.result(60).token_ids) == 2
    service.tokenizer = held._tokenizer


def test_no_wait_unload_gives_the_same_answer_on_both_engines(server_factory, adapter_root):
    """Defect 8: a request holds its lease until its engine job has finished, not until its stream
    is read: while it decodes, no_wait is FAILED_PRECONDITION; once decoded (even unread), OK."""
    server = server_factory(adapter_root=adapter_root, metrics_port=None)
    registry = server.running.registry
    with EngineBrake(server) as brake, server.client() as client:
        client.load_adapter("delta", "beta.onnx_adapter")
        brake.hold()
        stream = client.stream("delta", "The weather today", max_new_tokens=8, ignore_eos=True)
        assert next(stream).adapter == "delta"
        wait_until(lambda: registry.get("delta").leases == 1, what="delta in use")
        code, details = code_of(lambda: client.unload_adapter("delta", no_wait=True))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "in flight" in details
        brake.release()
        wait_until(lambda: registry.get("delta").leases == 0, what="the job to finish in the engine")
        assert client.unload_adapter("delta", no_wait=True).requests_served == 1  # the stream is not read yet
        assert sum(len(chunk.token_ids) for chunk in stream) == 8  # and is still delivered whole


def test_bad_version_label_is_invalid_argument(server_factory, adapter_root):
    server = server_factory(adapter_root=adapter_root, metrics_port=None)
    with server.client() as client:
        for version in ("v" * 65, "v1\n", "v\0"):
            code, details = code_of(lambda v=version: client.load_adapter("delta", "beta.onnx_adapter", version=v))
            assert code == INVALID and "version" in details
        assert "delta" not in [a.name for a in client.list_adapters()]


TOKEN = "t0ken-for-all"


def test_auth_scope_all_guards_every_contract_call_and_refuses_two_headers(server_factory, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    server = server_factory(auth_token_file=token_file, auth_scope="all", metrics_port=None)
    good = ("authorization", f"Bearer {TOKEN}")
    request = generation_pb2.GenerateRequest(adapter="alpha", prompt="hi",
                                             params=generation_pb2.SamplingParams(max_new_tokens=2))
    with server.client() as client:
        assert client.health() == "SERVING"  # health stays open for load balancers
        for metadata in (None, [("authorization", "Bearer wrong")], [("authorization", "Bearer wrong"), good],
                         [good, ("authorization", "Bearer wrong")], [good, good]):
            code, details = code_of(lambda m=metadata: client.generation.Generate(request, metadata=m, timeout=10))
            assert code == grpc.StatusCode.UNAUTHENTICATED, metadata
            code, _ = code_of(lambda m=metadata: client.adapters.List(adapters_pb2.ListAdaptersRequest(), metadata=m))
            assert code == grpc.StatusCode.UNAUTHENTICATED
        assert "more than one" in code_of(lambda: client.generation.Generate(request, metadata=[good, good]))[1]
        assert len(client.generation.Generate(request, metadata=[good], timeout=10).token_ids) == 2
        assert client.adapters.List(adapters_pb2.ListAdaptersRequest(), metadata=[good]).adapters
