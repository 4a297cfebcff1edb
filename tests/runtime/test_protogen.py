"""The committed generated code matches the .proto files (regenerated into a temp dir, compared)."""

from __future__ import annotations

from loraplex.runtime.app import protogen


def test_committed_generated_code_is_fresh(tmp_path):
    fresh = protogen.generate(out_root=tmp_path)
    assert {p.name for p in fresh} == {
        "adapters_pb2.py", "adapters_pb2_grpc.py",
        "generation_pb2.py", "generation_pb2_grpc.py",
    }
    committed = protogen.PROTO_ROOT / protogen.PROTO_PACKAGE
    stale = [p.name for p in fresh if (committed / p.name).read_bytes() != p.read_bytes()]
    assert not stale, f"generated code is stale: {stale}; run `make proto` and commit the result"


def test_contract_names_match_the_issue():
    from loraplex.v1 import adapters_pb2, generation_pb2

    generation = generation_pb2.DESCRIPTOR.services_by_name["Generation"]
    assert [m.name for m in generation.methods] == ["Generate", "GenerateStream", "Tokenize", "ModelInfo", "Classify"]
    adapters = adapters_pb2.DESCRIPTOR.services_by_name["Adapters"]
    assert [m.name for m in adapters.methods] == ["List", "Load", "Unload"]
    request = generation_pb2.GenerateRequest.DESCRIPTOR
    assert [f.name for f in request.oneofs_by_name["input"].fields] == ["prompt", "inputs"]
    assert {"adapter", "params", "request_id"} <= set(request.fields_by_name)
    params = generation_pb2.SamplingParams.DESCRIPTOR.fields_by_name
    assert set(params) == {
        "max_new_tokens", "temperature", "top_p", "top_k", "seed", "repetition_penalty", "stop",
        "ignore_eos",  # an extension for benchmarks: every request does the same work
        "output", "no_default_output",  # structured output
        "logprobs",  # scores
    }
    constraint = adapters_pb2.OutputConstraint.DESCRIPTOR
    assert [f.name for f in constraint.oneofs_by_name["kind"].fields] == ["regex", "json_schema", "grammar", "choice"]
    assert set(generation_pb2.FinishReason.keys()) >= {"LENGTH", "STOP", "EOS", "CANCELLED"}
    info = adapters_pb2.AdapterInfo.DESCRIPTOR.fields_by_name
    assert {"name", "version", "rank", "target_modules", "size_bytes", "template", "requests_served"} <= set(info)
