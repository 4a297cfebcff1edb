"""Weighted adapter mixes (`GenerateRequest.mix`): tokens equal a derived adapter built here with numpy
(A concatenated, weight * B concatenated) and loaded as an ordinary adapter, on both engines."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import grpc
import httpx2
import numpy as np
import onnxruntime as ort
import pytest
from loraplex.adapters.package.adapter_file import write_adapter_file
from loraplex.adapters.package.reader import Package

from tests.fixtures.http import chat_prompt, http_url, openai_client
from tests.fixtures.serving import EngineBrake, wait_until

PROMPT = "the quick brown fox"
GREEDY = dict(max_new_tokens=12, ignore_eos=True, no_default_output=True)


def tensors(file: Path) -> dict[str, np.ndarray]:
    params = ort.AdapterFormat.read_adapter(str(file)).get_parameters()
    return {name: np.array(value.numpy(), copy=True) for name, value in params.items()}


def derived(package: Path, mix: list[tuple[str, float]], files: dict[str, Path] | None = None
            ) -> dict[str, np.ndarray]:
    """The adapter equal to the mix, built independently: per module, A's side by side, weight * B's stacked."""
    pkg = Package.open(package)
    parts = [(tensors((files or {}).get(name) or pkg.adapter_path(name)), np.float32(w)) for name, w in mix]
    modules = sorted({n.split(".lora_")[0] for t, _ in parts for n in t})
    out = {}
    for module in modules:
        a, b = f"{module}.lora_A.MatMul.weight", f"{module}.lora_B.MatMul.weight"
        have = [(t[a], t[b], w) for t, w in parts if a in t]
        out[a] = np.concatenate([x for x, _, _ in have], axis=1)
        out[b] = np.concatenate([(y.astype(np.float32) * w).astype(y.dtype) for _, y, w in have], axis=0)
    return out


def put(root: Path, name: str, weights: dict[str, np.ndarray]) -> str:
    """Write an adapter file with its sha256 beside it under `root`; its path relative to `root`."""
    file = write_adapter_file(weights, root / f"{name}.onnx_adapter")
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    (root / f"{name}.onnx_adapter.sha256").write_text(f"{digest}  {file.name}\n")
    return file.name


def tokens(client, adapter: str = "", mix=(), prompt: str = PROMPT) -> list[int]:
    return list(client.generate(adapter, prompt, mix=mix, **GREEDY).token_ids)


@pytest.fixture
def mix_server(server_factory, tmp_path):
    return server_factory(adapter_root=tmp_path)


def test_mix_equals_derived_adapter(mix_server, recipe_package, tmp_path):
    mixes = [[("alpha", 0.7), ("beta", -0.4)], [("beta", 1.3), ("gamma", 0.5), ("alpha", 0.25)]]
    with mix_server.client() as client:
        for i, mix in enumerate(mixes):
            client.load_adapter(f"derived{i}", put(tmp_path, f"derived{i}", derived(recipe_package, mix)))
            got = client.generate("", PROMPT, mix=mix, **GREEDY)
            assert got.adapter.startswith("mix:")
            assert list(got.token_ids) == tokens(client, f"derived{i}")
            assert list(got.token_ids) != tokens(client, mix[0][0])  # the mix is not its first adapter
        # The order of a mix's adapters does not change it.
        assert tokens(client, mix=mixes[0][::-1]) == tokens(client, "derived0")


def test_single_weight_is_the_scale_knob(mix_server):
    with mix_server.client() as client:
        for name in ("alpha", "beta", "gamma"):
            assert tokens(client, mix=[(name, 1.0)]) == tokens(client, name)
            assert tokens(client, mix=[(name, 0.0)]) == tokens(client)  # weight 0: the base model
        scaled = tokens(client, mix=[("beta", 2.0)])
        assert scaled != tokens(client, "beta") and scaled != tokens(client)


def test_rows_with_different_mixes_in_one_step_equal_each_alone(server):
    mixes = [[("alpha", 0.5), ("beta", 0.5)], [("beta", -1.0), ("gamma", 1.5)], [("gamma", 0.8)], []]
    prompts = ["one two three", "a b c d", "hello there", "the quick"]
    with server.client() as client:
        alone = [tokens(client, mix=m, prompt=p) for m, p in zip(mixes, prompts, strict=True)]
        together: list[list[int] | None] = [None] * len(mixes)
        with EngineBrake(server) as brake:
            brake.hold()  # every request is submitted before any decodes past its first token

            def run(i: int) -> None:
                together[i] = tokens(client, mix=mixes[i], prompt=prompts[i])

            threads = [threading.Thread(target=run, args=(i,)) for i in range(len(mixes))]
            for t in threads:
                t.start()
            wait_until(lambda: server.running.service.in_flight == len(mixes), what="all requests in flight")
            brake.release()
            for t in threads:
                t.join(60)
    assert together == alone
    assert len({tuple(t) for t in alone}) == len(alone)


@pytest.mark.parametrize("mix, words", [
    ([("alpha", 1.0), ("beta", 1.0), ("gamma", 1.0), ("delta", 1.0), ("eps", 1.0)], "at most 4"),
    ([("alpha", float("nan"))], "weight"),
    ([("alpha", 2.5)], "[-2, 2]"),
    ([("alpha", -3.0)], "[-2, 2]"),
    ([("alpha", 0.5), ("alpha", 0.5)], "twice"),
    ([("", 1.0)], "names no adapter"),
])
def test_bad_mixes_are_invalid(server, mix, words):
    with server.client() as client, pytest.raises(grpc.RpcError) as err:
        client.generate("", PROMPT, mix=mix, **GREEDY)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in err.value.details()


def test_mix_and_adapter_together_are_invalid(server):
    with server.client() as client, pytest.raises(grpc.RpcError) as err:
        client.generate("alpha", PROMPT, mix=[("beta", 1.0)], **GREEDY)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "both" in err.value.details()


def test_unknown_adapter_in_a_mix_is_not_found(server):
    with server.client() as client, pytest.raises(grpc.RpcError) as err:
        client.generate("", PROMPT, mix=[("alpha", 1.0), ("nosuch", 0.5)], **GREEDY)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nosuch" in err.value.details()


def test_replacing_a_source_changes_the_mix(mix_server, recipe_package, tmp_path):
    mix = [("alpha", 0.6), ("gamma", 0.9)]
    stronger = {k: (v * 1.7 if ".lora_B." in k else v).astype(v.dtype)
                for k, v in tensors(Package.open(recipe_package).adapter_path("alpha")).items()}
    with mix_server.client() as client:
        before = client.generate("", PROMPT, mix=mix, **GREEDY)
        client.load_adapter("alpha", put(tmp_path, "alpha2", stronger))
        after = client.generate("", PROMPT, mix=mix, **GREEDY)
        assert after.adapter != before.adapter
        client.load_adapter("expected", put(tmp_path, "expected", derived(
            recipe_package, mix, {"alpha": tmp_path / "alpha2.onnx_adapter"})))
        assert list(after.token_ids) == tokens(client, "expected")
        assert list(after.token_ids) != list(before.token_ids)


def test_idle_mixes_beyond_max_mixes_are_unloaded(server_factory):
    server = server_factory(max_mixes=1)
    mixes = server.running.service.mixes
    with server.client() as client:
        first = tokens(client, mix=[("alpha", 0.5)])
        one = mixes.names()
        tokens(client, mix=[("beta", 0.5)])
        wait_until(lambda: len(mixes.names()) == 1 and mixes.names() != one, what="the first mix unloaded")
        wait_until(lambda: not any(mixes.dir.glob(f"{one[0][4:]}*")), what="its file removed")
        assert len(list(mixes.dir.iterdir())) == 1
        assert tokens(client, mix=[("alpha", 0.5)]) == first  # built again
        assert mixes.built == 3


def test_http_mix_extension_equals_grpc(http_server):
    mix = [("alpha", 0.7), ("gamma", -0.5)]
    body = [{"adapter": n, "weight": w} for n, w in mix]
    messages = [{"role": "user", "content": "hi there"}]
    with openai_client(http_server) as client, http_server.client() as grpc_client:
        base = client.models.list().data[0].id
        reply = client.completions.create(model=base, prompt=PROMPT, max_tokens=8, temperature=0,
                                          extra_body={"mix": body})
        assert reply.choices[0].text == grpc_client.generate("", PROMPT, mix=mix, max_new_tokens=8).text
        chat = client.chat.completions.create(model=base, messages=messages, max_tokens=8, temperature=0,
                                              extra_body={"mix": body})
        expected = grpc_client.generate("", chat_prompt(messages), mix=mix, max_new_tokens=8).text
        assert chat.choices[0].message.content == expected
        assert expected != grpc_client.generate("alpha", chat_prompt(messages), max_new_tokens=8).text
    url = f"{http_url(http_server)}/v1/completions"
    for payload, words in [({"model": "alpha", "mix": body}, "both"),
                           ({"model": base, "mix": [{"adapter": "alpha"}]}, "mix must be"),
                           ({"model": base, "mix": [{"adapter": "alpha", "weight": 9}]}, "[-2, 2]")]:
        answer = httpx2.post(url, timeout=60, content=json.dumps({"prompt": PROMPT, **payload}))
        assert answer.status_code == 400 and words in answer.json()["error"]["message"], answer.text


# -- against PyTorch PEFT (torch tier: the exported tiny package and its PEFT adapters) ----------------

@pytest.mark.parametrize("engine", ["batched", "genai"])
def test_mix_equals_peft_add_weighted_adapter_cat(engine, tiny_base, tiny_package, random_adapter_factory):
    import torch
    from loraplex.adapters.export.parity import TorchDecoder
    from loraplex.runtime.api import LLM

    from tests.fixtures.packages import TINY_SPEC, TINY_TEMPLATES

    torch_model = TorchDecoder(tiny_base, None)
    for name, rank, targets, seed in TINY_SPEC:  # the very adapters the package was exported from (cached)
        torch_model.load(name, random_adapter_factory(tiny_base, name, rank, targets, seed,
                                                      template=TINY_TEMPLATES[name]))
    mixes = {"m1": [("alpha", 0.7), ("gamma", -0.6)], "m2": [("beta", 1.4), ("alpha", -0.3), ("gamma", 0.5)]}
    for name, mix in mixes.items():
        torch_model.model.add_weighted_adapter([n for n, _ in mix], [w for _, w in mix], name,
                                               combination_type="cat")
    with LLM(tiny_package, engine=engine, max_batch=4) as llm:
        for name, mix in mixes.items():
            for prompt in ("the quick brown fox", "Review: fine\nSentiment:"):
                reply = llm.generate(prompt, mix=mix, max_new_tokens=8, logprobs=0, ignore_eos=True)
                ids = llm.tokenize(prompt)
                torch_model.model.set_adapter(name)
                with torch.no_grad():
                    sequence = torch.tensor([ids + reply.token_ids])
                    logits = torch_model.model(input_ids=sequence, attention_mask=torch.ones_like(sequence)).logits
                expected = torch.log_softmax(logits[0].double(), dim=-1).numpy()[len(ids) - 1:]
                assert reply.token_ids == [int(i) for i in expected[:-1].argmax(-1)]
                assert reply.token_ids != llm.generate(prompt, adapter=mix[0][0], max_new_tokens=8,
                                                       ignore_eos=True).token_ids
                for i, (token, scored) in enumerate(zip(reply.token_ids, reply.logprobs, strict=True)):
                    assert abs(scored.logprob - expected[i, token]) < 1e-3


def test_a_mix_resolves_its_adapters_in_the_stores_and_is_keyed_by_content(server_factory, recipe_package, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    alpha = Package.open(recipe_package).adapter_path("alpha")
    (store / "delta.onnx_adapter").write_bytes(alpha.read_bytes())  # alpha under another name: same sha256
    (store / "delta.onnx_adapter.sha256").write_text(hashlib.sha256(alpha.read_bytes()).hexdigest() + "\n")
    server = server_factory(adapter_stores=[store], metrics_port=None)
    with server.client() as client:
        stored = client.generate("", PROMPT, mix=[("delta", 0.5), ("beta", 0.5)], **GREEDY)
        loaded = client.generate("", PROMPT, mix=[("beta", 0.5), ("alpha", 0.5)], **GREEDY)
    assert stored.adapter == loaded.adapter and stored.token_ids == loaded.token_ids
    assert server.running.service.mixes.built == 1


@pytest.mark.parametrize("engine", ["batched", "genai"])
def test_in_process_api_mix(engine, recipe_package):
    from loraplex.runtime.api import LLM
    from loraplex.runtime.errors import InvalidRequest

    with LLM(recipe_package, engine=engine, max_batch=4) as llm:
        options = dict(max_new_tokens=10, ignore_eos=True, no_default_output=True)
        assert llm.generate(PROMPT, mix=[("gamma", 1.0)], **options).token_ids == llm.generate(
            PROMPT, adapter="gamma", **options).token_ids
        mixed = llm.generate(PROMPT, mix=[("gamma", 0.5), ("alpha", 1.5)], **options)
        assert mixed.token_ids != llm.generate(PROMPT, adapter="gamma", **options).token_ids
        chunks = list(llm.stream(PROMPT, mix=[("gamma", 0.5), ("alpha", 1.5)], **options))
        assert [t for c in chunks for t in c.token_ids] == mixed.token_ids
        with pytest.raises(InvalidRequest):
            llm.generate(PROMPT, mix=[("gamma", 5.0)])


def test_cli_generate_mix(server, capsys):
    from loraplex.runtime.app.cli import main

    with server.client() as client:
        want = client.generate("", PROMPT, mix=[("alpha", 0.7), ("beta", 0.3)], max_new_tokens=6).text
    assert main(["generate", "--target", server.target, "--prompt", PROMPT, "--mix", "alpha=0.7", "--mix", "beta=0.3",
                 "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == want + "\n"
    assert main(["generate", "--target", server.target, "--prompt", PROMPT, "--mix", "alpha"]) == 2
    assert "NAME=WEIGHT" in capsys.readouterr().err
    assert main(["generate", "--target", server.target, "--prompt", PROMPT, "--mix", "alpha=7"]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


def test_a_mix_renders_inputs_only_through_a_template_its_adapters_share(server):
    with server.client() as client:
        fields = {"text": "the movie was great"}
        one = client.generate("", inputs=fields, mix=[("alpha", 1.0)], max_new_tokens=6, no_default_output=True)
        assert one.token_ids == client.generate("alpha", inputs=fields, max_new_tokens=6,
                                                no_default_output=True).token_ids
        with pytest.raises(grpc.RpcError) as err:
            client.generate("", inputs=fields, mix=[("alpha", 0.5), ("beta", 0.5)], max_new_tokens=6)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no task template" in err.value.details()


def test_a_mix_has_no_default_output_contract(server_factory, recipe_package, tmp_path):
    labels = [" yes", " no", " maybe"]
    package = shutil.copytree(recipe_package, tmp_path / "package")
    data = json.loads((package / "manifest.json").read_text())
    data["adapters"]["alpha"]["output"] = {"kind": "choice", "spec": labels}
    (package / "manifest.json").write_text(json.dumps(data))
    server = server_factory(package=package, metrics_port=None)
    with server.client() as client:
        assert client.generate("alpha", PROMPT, max_new_tokens=8).text in labels  # the adapter's contract
        free = client.generate("alpha", PROMPT, max_new_tokens=8, no_default_output=True)
        assert free.text not in labels
        assert client.generate("", PROMPT, mix=[("alpha", 1.0)], max_new_tokens=8).token_ids == free.token_ids
