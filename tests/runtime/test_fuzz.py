"""A property-based fuzz of the request space (Hypothesis), on both engines at once.

Every drawn request goes to a batched and a genai server loaded alike. Properties: each answer is a
documented status (never UNKNOWN or INTERNAL), both engines give the same status, and greedy
completions and token ids are the same on both; afterwards both still serve, nothing is left in
flight and greedy outputs are unchanged. CI draws a fixed set of examples (derandomized);
`make soak` draws more, at random (`--fuzz-examples`).
"""

from __future__ import annotations

from collections import Counter

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from loraplex.v1 import adapters_pb2, generation_pb2

from tests.fixtures.serving import ENGINES, ServerThread, serving_config
from tests.fixtures.soak import FUZZ_CODES, GREEDY_CHECKS, greedy_outputs

DOCUMENTED = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "PERMISSION_DENIED",
              "RESOURCE_EXHAUSTED", "UNAUTHENTICATED", "UNAVAILABLE"}
PACKAGE_ADAPTERS = ("alpha", "beta", "gamma")



def mostly(valid: st.SearchStrategy, wild: st.SearchStrategy, odds: int = 9) -> st.SearchStrategy:
    """Valid values `odds` times in `odds + 1` per field, so that with a dozen fields drawn a request
    still reaches decoding about half the time; the other half probes the edges."""
    return st.integers(0, odds).flatmap(lambda roll: wild if roll == odds else valid)


texts = st.text(st.characters(codec="utf-8"), max_size=40)
names = mostly(st.sampled_from(["", *PACKAGE_ADAPTERS]),
               st.one_of(st.sampled_from(["missing", "al\0pha", "spare\n", "a" * 300]), texts))
wild_floats = st.one_of(st.floats(width=32), st.sampled_from([0.001, 1e-40, 1e30, -1.0, 101.0]))
unit = mostly(st.sampled_from([0.0, 0.5, 0.9, 1.0]), wild_floats)
scale = mostly(st.sampled_from([0.0, 0.01, 0.7, 1.0, 1.3, 100.0]), wild_floats)
int32s = mostly(st.integers(0, 60), st.one_of(st.integers(-2, -1), st.sampled_from([2**31 - 1, -(2**31)])))
prompts = mostly(st.one_of(st.sampled_from(["The weather today", "Review: fine", "hello"]), texts),
                 st.sampled_from(["word " * 2000, "a\0b", ""]))
fields = mostly(st.fixed_dictionaries({"text": texts}),
                st.dictionaries(st.one_of(st.sampled_from(["text", "word"]), texts), texts, max_size=3))


VALID_OUTPUTS = [("regex", "[0-9]{1,4}"), ("regex", "(?:)"), ("choice", ["yes", "no"]),
                 ("grammar", 'start: "(" /[a-z]{1,3}/ ")"'),
                 ("json_schema", '{"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}')]
WILD_OUTPUTS = [("regex", "[0-"), ("json_schema", "{"), ("json_schema", "[]"), ("grammar", "start: nope"),
                ("choice", []), ("choice", [""]), ("regex", "a\0b"), ("empty", None)]
outputs = st.one_of(
    st.just(None), st.just(None),
    mostly(st.sampled_from(VALID_OUTPUTS), st.one_of(st.sampled_from(WILD_OUTPUTS), st.tuples(
        st.sampled_from(["regex", "grammar", "json_schema"]), texts)), odds=3),
)


def set_output(params: generation_pb2.SamplingParams, output) -> None:
    """The request's output constraint (valid kinds, malformed specs, an empty message)."""
    kind, spec = output
    if kind == "empty":
        params.output.SetInParent()
    elif kind == "choice":
        params.output.choice.choices.extend(spec)
    else:
        setattr(params.output, kind, spec)


@st.composite
def generate_requests(draw) -> generation_pb2.GenerateRequest:
    request_id = draw(mostly(st.sampled_from(["", "r-1"]), texts))
    request = generation_pb2.GenerateRequest(adapter=draw(names), request_id=request_id)
    which = draw(st.sampled_from(["prompt"] * 5 + ["inputs"] * 4 + ["none"]))
    if which == "prompt":
        request.prompt = draw(prompts)
    elif which == "inputs":
        request.inputs.fields.update(draw(fields))
    p = request.params
    p.max_new_tokens = draw(mostly(st.integers(0, 8), st.sampled_from([-1, 513, 2**31 - 1, -(2**31)])))
    p.temperature = draw(st.one_of(st.just(0.0), scale))
    p.top_p, p.top_k, p.repetition_penalty = draw(unit), draw(int32s), draw(scale)
    seed = draw(st.one_of(st.none(), st.integers(0, 2**64 - 1)))
    if seed is not None:
        p.seed = seed
    too_many = st.lists(st.just("x"), min_size=17, max_size=17)
    p.stop.extend(draw(mostly(st.lists(texts.filter(bool), max_size=2), st.one_of(st.lists(texts), too_many))))
    p.ignore_eos = draw(st.booleans())
    output = draw(outputs)
    if output is not None:
        set_output(p, output)
    p.no_default_output = draw(st.booleans())
    return request


@pytest.fixture(scope="module")
def twins(recipe_package, adapter_root):
    """A server per engine, same package and adapter root; greedy outputs recorded first."""
    servers = {engine: ServerThread(serving_config(recipe_package, engine=engine, adapter_root=adapter_root,
                                                   metrics_port=None)) for engine in ENGINES}
    baseline = {}
    for engine, server in servers.items():
        FUZZ_CODES.setdefault(engine, Counter())
        with server.client() as client:
            baseline[engine] = greedy_outputs(client)
    assert baseline["batched"] == baseline["genai"]
    yield servers, baseline
    for server in servers.values():
        server.stop()


def answer(call) -> tuple[str, object]:
    try:
        return "OK", call()
    except grpc.RpcError as exc:
        return exc.code().name, exc.details()


def on_both(twins, call) -> dict[str, tuple[str, object]]:
    """`call(client)` on each engine's server: the same documented status from both."""
    servers, _ = twins
    outcomes = {}
    for engine, server in servers.items():
        with server.client(timeout=60) as client:
            outcomes[engine] = answer(lambda c=client: call(c))
        FUZZ_CODES[engine][outcomes[engine][0]] += 1
    codes = {engine: code for engine, (code, _) in outcomes.items()}
    assert set(codes.values()) <= DOCUMENTED, outcomes
    assert len(set(codes.values())) == 1, outcomes
    return outcomes


@given(request=generate_requests(), streamed=st.booleans())
def test_generate_answers_the_same_documented_status_on_both_engines(twins, request, streamed):
    def call(client):
        if streamed:
            chunks = list(client.generation.GenerateStream(request, timeout=60))
            return [t for chunk in chunks for t in chunk.token_ids]
        return list(client.generation.Generate(request, timeout=60).token_ids)

    outcomes = on_both(twins, call)
    if outcomes["batched"][0] == "OK" and request.params.temperature == 0:
        assert outcomes["batched"][1] == outcomes["genai"][1]  # greedy: token for token


@given(request=generate_requests())
def test_tokenize_answers_the_same_on_both_engines(twins, request):
    tokenize = generation_pb2.TokenizeRequest(adapter=request.adapter)
    if request.WhichOneof("input") == "prompt":
        tokenize.prompt = request.prompt
    elif request.WhichOneof("input") == "inputs":
        tokenize.inputs.CopyFrom(request.inputs)
    outcomes = on_both(twins, lambda client: list(client.generation.Tokenize(tokenize, timeout=60).token_ids))
    assert outcomes["batched"][1] == outcomes["genai"][1] or outcomes["batched"][0] != "OK"


ADAPTER_FILES = ["alpha.onnx_adapter", "alpha_half.onnx_adapter", "garbage.onnx_adapter", "nan.onnx_adapter",
                 "half.onnx_adapter", "flipped.onnx_adapter", "unrecorded.onnx_adapter", "badsum.onnx_adapter",
                 "../outside/alpha.onnx_adapter", "escape.onnx_adapter", "loop_a/x.onnx_adapter", "notes.txt",
                 "/etc/passwd", "", "a" * 2000]
load_names = st.one_of(st.from_regex(r"fz[a-z0-9]{0,3}", fullmatch=True), names).filter(
    lambda n: n not in PACKAGE_ADAPTERS)


@given(name=load_names, path=st.one_of(st.sampled_from(ADAPTER_FILES), texts), version=st.one_of(st.just(""), texts),
       unload=st.booleans(), no_wait=st.booleans())
def test_load_and_unload_answer_the_same_on_both_engines(twins, name, path, version, unload, no_wait):
    if unload:
        request = adapters_pb2.UnloadAdapterRequest(name=name, no_wait=no_wait)
        on_both(twins, lambda client: client.adapters.Unload(request, timeout=60).name)
    else:
        request = adapters_pb2.LoadAdapterRequest(name=name, path=path, version=version)
        on_both(twins, lambda client: client.adapters.Load(request, timeout=60).sha256)


RAW_METHODS = ["/loraplex.v1.Generation/Generate", "/loraplex.v1.Generation/Tokenize",
               "/loraplex.v1.Generation/ModelInfo", "/loraplex.v1.Adapters/List", "/grpc.health.v1.Health/Check"]


@given(method=st.sampled_from(RAW_METHODS), payload=st.binary(max_size=80))
def test_arbitrary_request_bytes_answer_the_same_documented_status(twins, method, payload):
    def call(client):
        raw = client.channel.unary_unary(method)(payload, timeout=60)
        return raw if method.endswith(("Generate", "Tokenize")) else None  # other answers differ by engine

    on_both(twins, call)


def test_after_the_fuzz_both_engines_serve_as_before(twins):
    servers, baseline = twins
    for engine, server in servers.items():
        service, registry = server.running.service, server.running.registry
        assert service.in_flight == 0
        assert all(v.leases == 0 for v in registry.versions())
        with server.client() as client:
            assert client.health() == "SERVING"
            assert greedy_outputs(client) == baseline[engine], engine
    assert len(GREEDY_CHECKS) == 12
