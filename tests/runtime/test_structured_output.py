"""Structured output over a real gRPC server, on BOTH engines: each constraint kind holds
for every output (greedy and sampled, on a random model), constrained and unconstrained requests
share the server without changing each other's tokens, an adapter's default contract from the
manifest applies unless the request brings its own or opts out, and bad specs are INVALID_ARGUMENT."""

from __future__ import annotations

import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from loraplex.adapters.package.manifest import Manifest
from loraplex.v1 import generation_pb2

from tests.fixtures.reference import genai_reference, package_files

PROMPTS = ["Review: the movie was great\nSentiment:", "Reverse: abc\nOutput:", "hello"]
ADAPTERS = ["", "alpha", "beta", "gamma"]
CHOICES = ["yes", "no", "maybe so"]
SAMPLED = [dict(temperature=1.0, seed=seed) for seed in (1, 2, 3)]
GREEDY = [dict()]
SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "label": {"enum": ["cat", "dog"]}},
    "required": ["ok", "label"],
    "additionalProperties": False,
}
DEFAULT_CHOICES = ["positive", "negative"]


def test_choice_constraint_makes_every_output_one_of_the_choices(server):
    with server.client() as client:
        for adapter in ADAPTERS:
            for prompt in PROMPTS:
                for params in GREEDY + SAMPLED:
                    response = client.generate(adapter, prompt, max_new_tokens=16, choice=CHOICES, **params)
                    assert response.text in CHOICES, (adapter, prompt, params, response.text)
                    assert response.finish_reason == generation_pb2.STOP


def test_regex_constraint_holds_for_every_output_of_a_random_model(server):
    with server.client() as client:
        for adapter in ADAPTERS:
            for prompt in PROMPTS:
                for params in GREEDY + SAMPLED:
                    response = client.generate(adapter, prompt, max_new_tokens=16, regex="[0-9]{1,6}", **params)
                    assert re.fullmatch("[0-9]{1,6}", response.text), (adapter, prompt, params, response.text)
                    assert response.finish_reason == generation_pb2.STOP


def test_json_schema_constraint_gives_valid_compact_json(server):
    with server.client() as client:
        for adapter in ADAPTERS:
            for params in GREEDY + SAMPLED:
                response = client.generate(adapter, PROMPTS[0], max_new_tokens=48, json_schema=json.dumps(SCHEMA),
                                           **params)
                value = json.loads(response.text)
                assert set(value) == {"ok", "label"} and isinstance(value["ok"], bool), response.text
                assert value["label"] in ("cat", "dog")
                assert not re.search(r"\s", response.text), "whitespace is bounded (none between tokens)"
                assert response.finish_reason == generation_pb2.STOP


def test_lark_grammar_constraint(server):
    grammar = 'start: "(" NUM ")"\nNUM: /[0-9]{1,3}/\n'
    with server.client() as client:
        for adapter in ADAPTERS:
            for params in GREEDY + SAMPLED:
                response = client.generate(adapter, PROMPTS[1], max_new_tokens=16, grammar=grammar, **params)
                assert re.fullmatch(r"\([0-9]{1,3}\)", response.text), response.text


def test_a_constraint_cut_by_max_new_tokens_ends_with_length(server):
    with server.client() as client:
        response = client.generate("alpha", PROMPTS[0], max_new_tokens=2, regex="[a-z]{40}")
    assert response.finish_reason == generation_pb2.LENGTH
    assert len(response.token_ids) == 2 and re.fullmatch("[a-z]+", response.text)


def test_constrained_and_free_requests_together_keep_their_own_tokens(server):
    """Greedy requests give the same tokens whether constrained neighbours share the engine or not."""
    kinds = ("free", "choice", "regex")
    jobs = [(adapter, prompt, kind) for adapter in ADAPTERS for prompt in PROMPTS for kind in kinds]
    constraint = {"free": {}, "choice": {"choice": CHOICES}, "regex": {"regex": "[0-9]{1,6}"}}
    with server.client() as client:
        alone = {job: list(client.generate(job[0], job[1], max_new_tokens=12, **constraint[job[2]]).token_ids)
                 for job in jobs}
        with ThreadPoolExecutor(8) as pool:
            futures = {job: pool.submit(client.generate, job[0], job[1], max_new_tokens=12, **constraint[job[2]])
                       for job in jobs}
            together = {job: list(f.result().token_ids) for job, f in futures.items()}
    assert together == alone


@pytest.mark.parametrize(("kwargs", "field"), [
    (dict(regex="[a-"), "params.output.regex"),
    (dict(json_schema="{not json"), "params.output.json_schema"),
    (dict(json_schema='{"type": "no-such-type"}'), "params.output.json_schema"),
    (dict(json_schema="[1, 2]"), "params.output.json_schema"),
    (dict(grammar="start: undefined_rule"), "params.output.grammar"),
    (dict(choice=[]), "params.output"),
    (dict(choice=["ok", ""]), "params.output.choice.choices"),
])
def test_invalid_specs_are_invalid_argument_naming_the_field(server, kwargs, field):
    with server.client() as client, pytest.raises(grpc.RpcError) as raised:
        client.generate("alpha", PROMPTS[0], max_new_tokens=4, **kwargs)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in raised.value.details()


# -- the adapter's default output contract (manifest) -------------------------------------------


@pytest.fixture(scope="module")
def contract_package(tmp_path_factory, recipe_package) -> Path:
    """The recipe package with a choice contract recorded for alpha (as export writes it)."""
    root = tmp_path_factory.mktemp("contract") / "package"
    shutil.copytree(recipe_package, root)
    data = json.loads((root / "manifest.json").read_text())
    data["adapters"]["alpha"]["output"] = {"kind": "choice", "spec": DEFAULT_CHOICES}
    (root / "manifest.json").write_text(json.dumps(data))
    return root


def free_reference(root: Path, client, adapter: str, prompt: str, max_new_tokens: int) -> list[int]:
    """onnxruntime-genai's greedy completion ids for `prompt` on `adapter`, with no constraint."""
    files = package_files(root)
    return genai_reference(files.root, files.adapters[adapter], tuple(client.tokenize(adapter, prompt)),
                           max_new_tokens)


def test_adapter_default_applies_and_opt_out_removes_it(server_factory, contract_package, recipe_package):
    server = server_factory(package=contract_package)
    prompts = [PROMPTS[0], "Review: dull and far too long\nSentiment:", "hello"]
    with server.client() as client:
        for prompt in prompts:
            for params in GREEDY + SAMPLED:
                response = client.generate("alpha", prompt, max_new_tokens=8, **params)
                assert response.text in DEFAULT_CHOICES and response.finish_reason == generation_pb2.STOP
            own = client.generate("alpha", prompt, max_new_tokens=8, regex="[0-9]{1,4}")
            assert re.fullmatch("[0-9]{1,4}", own.text), "the request's own constraint replaces the default"
        for prompt in prompts:
            free = client.generate("alpha", prompt, max_new_tokens=12, no_default_output=True)
            assert list(free.token_ids) == free_reference(recipe_package, client, "alpha", prompt, 12)
            assert free.text not in DEFAULT_CHOICES
        # Other adapters have no contract: their output is free.
        response = client.generate("beta", PROMPTS[1], max_new_tokens=12)
        assert list(response.token_ids) == free_reference(recipe_package, client, "beta", PROMPTS[1], 12)
        info = client.model_info()
        assert dict(info.outputs) == {"alpha": info.outputs["alpha"]}
        assert list(info.outputs["alpha"].choice.choices) == DEFAULT_CHOICES
        listed = {a.name: a for a in client.list_adapters()}
        assert list(listed["alpha"].output.choice.choices) == DEFAULT_CHOICES
        assert not listed["beta"].HasField("output")


def test_manifests_without_output_contracts_still_load(recipe_package):
    data = json.loads((recipe_package / "manifest.json").read_text())
    data["schema_version"] = 2
    for entry in data["adapters"].values():
        entry.pop("output", None)
    manifest = Manifest.from_dict(data)
    assert all(entry.output_constraint() is None for entry in manifest.adapters.values())


@pytest.mark.parametrize(("kwargs", "text", "reason"), [
    (dict(regex="(?:)"), "", generation_pb2.STOP),  # only the empty completion
    (dict(regex="a{0}"), "", generation_pb2.STOP),
    (dict(grammar='start: ""'), "", generation_pb2.STOP),
    (dict(regex="[^\\s\\S]"), "", generation_pb2.STOP),  # the empty language: nothing can be produced
    (dict(regex="[a-c]{100000}"), None, generation_pb2.LENGTH),  # longer than any budget
    (dict(regex="\\$"), "$", generation_pb2.STOP),
    (dict(choice=["a", "a", "ab"]), None, generation_pb2.STOP),
])
def test_edge_constraints_end_cleanly(server, kwargs, text, reason):
    with server.client() as client:
        response = client.generate("beta", PROMPTS[0], max_new_tokens=6, **kwargs)
    assert response.finish_reason == reason
    if text is not None:
        assert response.text == text
    elif "choice" in kwargs:
        assert response.text in ("a", "ab")
    else:
        assert re.fullmatch("[a-c]+", response.text) and len(response.token_ids) == 6


def test_a_replacement_keeps_the_contract_and_a_new_name_has_none(server_factory, contract_package, adapter_root):
    """Load of a file the manifest does not describe: as a replacement it keeps serving the task's
    contract (as it keeps its template); under a new name it has none."""
    server = server_factory(package=contract_package, adapter_root=adapter_root)
    with server.client() as client:
        replaced = client.load_adapter("alpha", "alpha_half.onnx_adapter")
        assert list(replaced.output.choice.choices) == DEFAULT_CHOICES
        assert client.generate("alpha", PROMPTS[0], max_new_tokens=8).text in DEFAULT_CHOICES
        fresh = client.load_adapter("delta", "alpha_half.onnx_adapter")
        assert not fresh.HasField("output")
        assert "delta" not in client.model_info().outputs


def test_http_shows_the_contract_applies_it_and_text_opts_out(server_factory, contract_package):
    import httpx2

    from tests.fixtures.http import http_url

    server = server_factory(package=contract_package, http_port=0)
    url = http_url(server)
    cards = {m["id"]: m for m in httpx2.get(f"{url}/v1/models", timeout=30).json()["data"]}
    assert cards["alpha"]["output"] == {"kind": "choice", "spec": DEFAULT_CHOICES}
    assert "output" not in cards["beta"]
    body = {"model": "alpha", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0}
    constrained = httpx2.post(f"{url}/v1/completions", json=body, timeout=30).json()
    assert constrained["choices"][0]["text"] in DEFAULT_CHOICES
    free = httpx2.post(f"{url}/v1/completions", json={**body, "response_format": {"type": "text"}}, timeout=30).json()
    with server.client() as client:
        grpc_free = client.generate("alpha", PROMPTS[0], max_new_tokens=8, no_default_output=True)
    assert free["choices"][0]["text"] == grpc_free.text and grpc_free.text not in DEFAULT_CHOICES


def test_an_engine_without_guidance_refuses_constraints_instead_of_ignoring_them(server):
    """The genai engine probes its onnxruntime-genai build at start (this one has guidance); a build
    without it answers FAILED_PRECONDITION to constrained requests and still serves free ones."""
    engine = server.running.service.engine
    if engine.name != "genai":
        pytest.skip("the batched engine always has llguidance")
    assert engine.executor.guidance is None  # the CPU wheel enforces constraints
    engine.executor.guidance = "guidance is not enabled in this build"  # as the probe reports such a build
    try:
        with server.client() as client:
            with pytest.raises(grpc.RpcError) as raised:
                client.generate("alpha", PROMPTS[0], max_new_tokens=4, regex="[0-9]+")
            assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "guidance" in raised.value.details()
            assert client.generate("alpha", PROMPTS[0], max_new_tokens=4).finish_reason
    finally:
        engine.executor.guidance = None
