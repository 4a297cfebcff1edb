"""The OpenAI-compatible HTTP port with the official `openai` client, on both engines: models,
completions, chat, streaming, task inputs, errors in OpenAI's shape; greedy text equal to gRPC's."""

from __future__ import annotations

import json
import urllib.request

import httpx2
import openai
import pytest

from tests.fixtures.http import chat_prompt, http_url, openai_client

PROMPT = "The weather today"


def metric_text(url: str) -> str:
    return urllib.request.urlopen(url, timeout=10).read().decode()


def post(server, path: str, body, **kwargs) -> httpx2.Response:
    content = body if isinstance(body, bytes | str) else json.dumps(body)
    return httpx2.post(f"{http_url(server)}{path}", content=content, timeout=30, **kwargs)


def test_models_lists_the_base_and_every_adapter_with_its_version(http_server):
    with openai_client(http_server) as client:
        models = {m.id: m for m in client.models.list()}
        assert set(models) == {"base:llama", "alpha", "beta", "gamma"}
        versions = {v.name: v.version for v in http_server.running.registry.versions()}
        for name, version in versions.items():
            assert models[name].model_extra["version"] == version
            assert models[name].model_extra["parent"] == "base:llama"
        assert models["alpha"].model_extra["inputs"] == ["text"]  # the template's fields
        assert client.models.retrieve("beta").id == "beta"
        with pytest.raises(openai.NotFoundError) as err:
            client.models.retrieve("nope")
        assert "alpha" in err.value.message and err.value.code == "NOT_FOUND"
    assert httpx2.get(f"{http_url(http_server)}/health").json() == {"status": "SERVING"}


def test_greedy_completion_equals_the_grpc_response(http_server):
    with openai_client(http_server) as client, http_server.client() as grpc_client:
        for model, adapter in (("alpha", "alpha"), ("base:llama", "")):
            want = grpc_client.generate(adapter, PROMPT, max_new_tokens=12, ignore_eos=True)
            got = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0,
                                            extra_body={"ignore_eos": True})
            assert got.choices[0].text == want.text
            assert got.choices[0].finish_reason == "length"
            assert got.model == model and got.object == "text_completion"
            assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.usage.prompt_tokens, 12)
            assert got.usage.total_tokens == want.usage.prompt_tokens + 12
            assert got.model_extra["loraplex"]["adapter_version"] == want.adapter_version

            chunks = list(client.completions.create(model=model, prompt=[PROMPT], max_tokens=12, temperature=0,
                                                    stream=True, stream_options={"include_usage": True},
                                                    extra_body={"ignore_eos": True}))
            assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
            assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_task_inputs_stop_and_seed(http_server):
    inputs = {"text": "the movie was great"}
    with openai_client(http_server) as client, http_server.client() as grpc_client:
        want = grpc_client.generate("alpha", inputs=inputs, max_new_tokens=6).text
        got = client.completions.create(model="alpha", prompt=None, max_tokens=6, temperature=0,
                                        extra_body={"inputs": inputs})
        assert got.choices[0].text == want

        full = grpc_client.generate("beta", PROMPT, max_new_tokens=16, ignore_eos=True).text
        stop = full[4:7]
        stopped = client.completions.create(model="beta", prompt=PROMPT, max_tokens=16, temperature=0, stop=stop,
                                            extra_body={"ignore_eos": True})
        assert stopped.choices[0].finish_reason == "stop"
        assert stopped.choices[0].text == full[:full.index(stop)]

        sampled = [client.completions.create(model="gamma", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7,
                                             top_p=0.9, extra_body={"top_k": 20, "ignore_eos": True})
                   for _ in range(2)]
        assert sampled[0].choices[0].text == sampled[1].choices[0].text


def test_chat_renders_the_packages_chat_template(http_server):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    with openai_client(http_server) as client, http_server.client() as grpc_client:
        want = grpc_client.generate("beta", chat_prompt(messages), max_new_tokens=10, ignore_eos=True)
        got = client.chat.completions.create(model="beta", messages=messages, max_tokens=10, temperature=0,
                                             extra_body={"ignore_eos": True})
        assert got.object == "chat.completion"
        assert got.choices[0].message.role == "assistant"
        assert got.choices[0].message.content == want.text
        assert got.usage.prompt_tokens == want.usage.prompt_tokens

        chunks = list(client.chat.completions.create(
            model="beta", messages=[{"role": "developer", "content": "be brief"},  # developer: the system role
                                    {"role": "user", "content": [{"type": "text", "text": "hello"}]}],
            max_completion_tokens=10, temperature=0, stream=True, extra_body={"ignore_eos": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
        assert chunks[-1].choices[0].finish_reason == "length"


def test_every_http_request_counts_in_the_one_metrics_registry(http_server):
    line = 'loraplex_requests_total{adapter="gamma",status="OK"}'

    def count(text: str) -> float:
        return next((float(x.rpartition(" ")[2]) for x in text.splitlines() if x.startswith(line + " ")), 0.0)

    metrics_port = f"http://127.0.0.1:{http_server.running.metrics_port}/metrics"
    before = count(metric_text(metrics_port))
    with openai_client(http_server) as client:
        client.completions.create(model="gamma", prompt=PROMPT, max_tokens=2, temperature=0)
    with http_server.client() as grpc_client:
        grpc_client.generate("gamma", PROMPT, max_new_tokens=2)
    assert count(metric_text(metrics_port)) == before + 2
    assert count(metric_text(f"{http_url(http_server)}/metrics")) == before + 2  # the same registry


@pytest.mark.parametrize(("body", "param", "says"), [
    ({"temperature": 500}, "temperature", "temperature is 500"),
    ({"temperature": "hot"}, "temperature", "must be a number"),
    ({"top_p": 0}, "top_p", "(0, 1]"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens is 0"),
    ({"max_tokens": 100000}, "max_tokens", "context length"),
    ({"seed": -1}, "seed", "[0, 2**64)"),
    ({"n": 17}, "n", "1..16"),
    ({"n": 0}, "n", "1..16"),
    ({"logprobs": 21}, "logprobs", "0..20"),
    ({"logprobs": True}, "logprobs", "must be an integer"),
    ({"echo": True}, "echo", "not supported"),
    ({"presence_penalty": 0.5}, "presence_penalty", "repetition_penalty"),
    ({"stop": ["x"] * 17}, "stop", "at most 16"),
    ({"stop": 3}, "stop", "string or a list"),
    ({"messages": []}, "messages", "/v1/chat/completions"),
    ({"frobnicate": 1}, "frobnicate", "unknown field"),
    ({"prompt": "a\0b"}, "prompt", "NUL"),
    ({"prompt": [1, 2, 3]}, "prompt", "token ids"),
    ({"prompt": "hi", "inputs": {"text": "x"}}, "inputs", "not both"),
    ({"prompt": None, "inputs": {"nope": "x"}}, None, "nope"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "stream: true"),
])
def test_completion_refusals_name_the_field(http_server, body, param, says):
    request = {"model": "alpha", "prompt": PROMPT, **body}
    answer = post(http_server, "/v1/completions", request)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "INVALID_ARGUMENT"
    assert error["param"] == param and says in error["message"], error


@pytest.mark.parametrize(("body", "param", "says"), [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "tools"),
    ({"response_format": {"type": "xml"}}, "response_format", "response_format must be"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": "x"}}}, "response_format", "schema"),
    ({"guided_regex": "[0-"}, "guided_regex", "not a valid regex"),
    ({"guided_choice": "yes"}, "guided_choice", "list of strings"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "send one of them"),
    ({"top_logprobs": 2}, "top_logprobs", "needs logprobs: true"),
    ({"logprobs": False, "top_logprobs": 1}, "top_logprobs", "needs logprobs: true"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "0..20"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages", "role"),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages", "'name'"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages",
     "text only"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens", "differ"),
    ({"prompt": "hi"}, "prompt", "/v1/completions"),
])
def test_chat_refusals_name_the_field(http_server, body, param, says):
    request = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], **body}
    answer = post(http_server, "/v1/chat/completions", request)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and says in error["message"], error


def test_errors_reach_the_openai_client_as_its_exceptions(http_server):
    with openai_client(http_server) as client:
        with pytest.raises(openai.NotFoundError) as err:
            client.completions.create(model="gpt-4o", prompt="hi")
        assert err.value.status_code == 404 and "base:llama" in err.value.message
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], n=17)
        assert err.value.param == "n"
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="alpha", prompt="x" * 10**6)
        assert "--max-prompt-bytes" in err.value.message
    for raw, says in ((b"{not json", "not JSON"), (b"[1, 2]", "JSON object"), (b'{"temperature": NaN}', "NaN"),
                      (b'{"model": "alpha", "prompt": "\\ud800"}', "surrogate")):
        answer = post(http_server, "/v1/completions", raw)
        assert answer.status_code == 400 and says in answer.json()["error"]["message"], answer.text
    assert post(http_server, "/v1/nothing", {}).status_code == 404
    assert httpx2.get(f"{http_url(http_server)}/v1/completions").status_code == 405


SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}


def test_structured_output_through_response_format_and_guided_extensions(http_server):
    """response_format (json_schema, json_object) and vLLM's guided_* constrain the completion as the
    gRPC port's params.output does; the same greedy text on both ports."""
    import re

    messages = [{"role": "user", "content": "Is it raining?"}]
    with openai_client(http_server) as client, http_server.client() as grpc_client:
        for adapter in ("alpha", "beta"):
            chat = client.chat.completions.create(
                model=adapter, messages=messages, max_tokens=32, temperature=0,
                response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}})
            assert set(json.loads(chat.choices[0].message.content)) == {"ok"}
            assert chat.choices[0].finish_reason == "stop"
            loose = client.chat.completions.create(model=adapter, messages=messages, max_tokens=32, temperature=0,
                                                   response_format={"type": "json_object"})
            text = loose.choices[0].message.content  # any object: a random model may not close it in time
            if loose.choices[0].finish_reason == "stop":
                assert isinstance(json.loads(text), dict)
            else:
                assert loose.choices[0].finish_reason == "length" and text.startswith("{")
            done = client.completions.create(model=adapter, prompt=PROMPT, max_tokens=8, temperature=0,
                                             extra_body={"guided_choice": ["yes", "no"]})
            assert done.choices[0].text in ("yes", "no")
            grpc = grpc_client.generate(adapter, PROMPT, max_new_tokens=8, choice=["yes", "no"])
            assert done.choices[0].text == grpc.text
            for seed in (1, 2):
                digits = client.completions.create(model=adapter, prompt=PROMPT, max_tokens=8, seed=seed,
                                                   extra_body={"guided_regex": "[0-9]{1,4}"})
                assert re.fullmatch("[0-9]{1,4}", digits.choices[0].text)
