"""Generation over a real gRPC server: per-adapter output equals onnxruntime-genai's greedy tokens on the
recipe package, alone and concurrently, and on the exported package the tokens export verified."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from loraplex.adapters.export.parity import GENERIC_PROMPTS
from loraplex.adapters.package.manifest import Manifest
from loraplex.v1 import generation_pb2

from tests.fixtures.recipe_package import RecipeShape
from tests.fixtures.reference import genai_reference, package_files

EOS = 0  # <|endoftext|> of the tiny base and of the recipe
# Each adapter's task, as its template renders it, and a plain prompt (the base's too).
TASK_PROMPTS = {
    "alpha": ["Review: the movie was great\nSentiment:", "Review: dull and far too long\nSentiment:"],
    "beta": ["Reverse: stone\nOutput:", "Reverse: a fine day\nOutput:"],
    "gamma": ["Translate: bread\nFrench:", "Translate: house\nFrench:"],
}
PLAIN = "The weather today"


def expected(tokens: list[int]) -> tuple[list[int], int]:
    """Parity tokens (which may end in EOS) -> (completion ids the server returns, finish reason)."""
    if EOS in tokens:
        return tokens[: tokens.index(EOS)], generation_pb2.EOS
    return tokens, generation_pb2.LENGTH


@pytest.fixture(scope="module")
def manifest(recipe_package) -> Manifest:
    return Manifest.load(recipe_package)


@pytest.fixture(scope="module")
def exported_manifest(tiny_package) -> Manifest:
    return Manifest.load(tiny_package)


def greedy_jobs(client, root) -> list[tuple[str, str, list[int]]]:
    """(adapter, prompt, onnxruntime-genai's greedy completion ids) for the base and each adapter, 16 tokens."""
    files = package_files(root)
    jobs = []
    for name in ("", *TASK_PROMPTS):
        for prompt in (PLAIN, *TASK_PROMPTS.get(name, ())):
            ids = tuple(client.tokenize(name, prompt))
            jobs.append((name, prompt, genai_reference(files.root, files.adapters.get(name), ids, 16)))
    return jobs


def test_greedy_output_of_the_base_and_each_adapter_equals_onnxruntime_genai(server, manifest, recipe_package):
    with server.client() as client:
        jobs = greedy_jobs(client, recipe_package)
        for name, prompt, want in jobs:
            response = client.generate(name, prompt, max_new_tokens=16)
            assert list(response.token_ids) == want, (name, prompt)
            assert response.finish_reason == (generation_pb2.LENGTH if len(want) == 16 else generation_pb2.EOS)
            assert response.adapter == name
            assert response.adapter_version == (manifest.adapters[name].version if name else "base")
            assert response.usage.completion_tokens == len(want)
            assert response.usage.prompt_tokens == len(client.tokenize(name, prompt))
    assert len({tuple(want) for _, prompt, want in jobs if prompt == PLAIN}) == 1 + len(TASK_PROMPTS)


def test_greedy_output_per_adapter_equals_manifest_parity_tokens(exported_server, exported_manifest):
    """Export verified these tokens against PyTorch PEFT: the torch-built package's own record."""
    server, manifest = exported_server, exported_manifest
    checked = 0
    with server.client() as client:
        for name, entry in manifest.adapters.items():
            for prompt, tokens in zip(entry.parity.prompts, entry.parity.tokens, strict=True):
                response = client.generate(name, prompt, max_new_tokens=len(tokens))
                want, reason = expected(tokens)
                assert list(response.token_ids) == want, (name, prompt)
                assert response.finish_reason == reason
                assert response.adapter == name and response.adapter_version == entry.version
                assert response.usage.completion_tokens == len(want)
                assert response.usage.prompt_tokens == len(client.tokenize(name, prompt))
                checked += 1
    assert checked == sum(len(e.parity.prompts) for e in manifest.adapters.values()) >= 9


def test_base_model_output_equals_manifest_base_parity(exported_server, exported_manifest):
    server, manifest = exported_server, exported_manifest
    base = manifest.base_parity  # the tiny package is exported with verification: the bare base was checked
    assert base is not None and base.tokens_equal and base.prompts == list(GENERIC_PROMPTS)
    with server.client() as client:
        for prompt, tokens in zip(base.prompts, base.tokens, strict=True):
            want, _ = expected(tokens)
            assert list(client.generate("", prompt, max_new_tokens=len(tokens)).token_ids) == want


def test_adapters_change_the_output(server, manifest):
    prompt = TASK_PROMPTS["alpha"][0]
    with server.client() as client:
        names = ["", *manifest.adapters]
        outputs = {name: tuple(client.generate(name, prompt, max_new_tokens=8).token_ids) for name in names}
    assert len(set(outputs.values())) == len(outputs), outputs


def test_concurrent_requests_for_different_adapters_get_their_own_output(server, recipe_package):
    with server.client() as client:
        jobs = greedy_jobs(client, recipe_package) * 2
        with ThreadPoolExecutor(len(jobs)) as pool:
            futures = [pool.submit(client.generate, n, p, max_new_tokens=16) for n, p, _ in jobs]
            responses = [f.result() for f in futures]
    for (name, _prompt, tokens), response in zip(jobs, responses, strict=True):
        assert response.adapter == name
        assert list(response.token_ids) == tokens


def test_stream_pieces_add_up_to_the_unary_response(server):
    prompt = TASK_PROMPTS["beta"][1]
    with server.client() as client:
        unary = client.generate("beta", prompt, max_new_tokens=12)
        chunks = list(client.stream("beta", prompt, max_new_tokens=12))
    assert chunks[0].adapter == "beta" and chunks[0].adapter_version == unary.adapter_version
    assert "".join(c.text for c in chunks) == unary.text
    assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
    last = chunks[-1]
    assert last.finish_reason == unary.finish_reason and last.usage == unary.usage
    assert all(c.finish_reason == generation_pb2.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    assert last.timings.total_ms >= last.timings.time_to_first_token_ms > 0


def test_task_inputs_are_rendered_through_the_adapter_template(server, manifest):
    template = manifest.adapters["alpha"].template
    prompt = template["prompt"].format(text="the movie was great")
    with server.client() as client:
        by_inputs = client.generate("alpha", inputs={"text": "the movie was great"}, max_new_tokens=6)
        by_prompt = client.generate("alpha", prompt, max_new_tokens=6)
        assert client.tokenize("alpha", inputs={"text": "the movie was great"}) == client.tokenize("alpha", prompt)
    assert list(by_inputs.token_ids) == list(by_prompt.token_ids)


def test_same_seed_same_output_and_other_seed_differs(server):
    with server.client() as client:
        def sample(seed):
            response = client.generate("gamma", "The weather", max_new_tokens=24, temperature=1.5, seed=seed)
            return list(response.token_ids)

        first, again, other = sample(7), sample(7), sample(8)
    assert first == again
    assert first != other


def test_stop_string_ends_generation_and_is_not_returned(server):
    with server.client() as client:
        free = client.generate("alpha", "The weather today", max_new_tokens=16)
        assert len(free.text) > 4
        stop = free.text[2:4]
        cut = client.generate("alpha", "The weather today", max_new_tokens=16, stop=[stop])
        streamed = "".join(c.text for c in client.stream("alpha", "The weather today", max_new_tokens=16, stop=[stop]))
    assert cut.finish_reason == generation_pb2.STOP
    assert cut.text == free.text[: free.text.index(stop)]
    assert streamed == cut.text
    assert list(cut.token_ids) == list(free.token_ids[: len(cut.token_ids)])


def test_max_new_tokens_is_honoured(server):
    with server.client() as client:
        response = client.generate("beta", "The weather today", max_new_tokens=5)
    assert response.finish_reason == generation_pb2.LENGTH
    assert len(response.token_ids) == 5


def test_model_info_describes_the_package(server, manifest):
    with server.client() as client:
        info = client.model_info()
    assert info.engine == server.running.config.engine and info.device == "cpu"
    assert info.architecture == manifest.base.architecture
    assert info.lora_rank == manifest.lora_rank
    assert sorted(info.adapters) == sorted(manifest.adapters)
    assert info.context_length == RecipeShape().context  # the recipe package's context, as built
    assert info.max_batch == 4 and info.max_queue == 16


def test_unary_error_status_is_not_found_for_unknown_adapter(server):
    with server.client() as client, pytest.raises(grpc.RpcError) as err:
        client.generate("nope", "hi")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "alpha" in err.value.details()
