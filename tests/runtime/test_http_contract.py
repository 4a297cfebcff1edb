"""What the README promises of the OpenAI-compatible HTTP port beyond test_http.py, on both engines:
vLLM's `guided_*` extensions give the gRPC port's constrained greedy output, `x-request-id` is the
request's id (echoed, or made), an engine failure after a stream started ends it with one error
event before `data: [DONE]`, bodies over 4 MiB are 400 in OpenAI's error shape, and `best_of`,
`logit_bias` and `suffix` are refused with 400 naming the field unless they hold their no-op value."""

from __future__ import annotations

import http.client
import json
import re
from urllib.parse import urlsplit

import httpx2
import openai
import pytest
from loraplex.v1 import generation_pb2

from tests.fixtures.http import chat_prompt, http_url, openai_client
from tests.fixtures.serving import wait_until

PROMPT = "Review: the movie was great\nSentiment:"
MAX_BODY = 4 * 1024 * 1024  # the README's "bodies over 4 MiB"
SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "label": {"enum": ["cat", "dog"]}},
    "required": ["ok", "label"],
    "additionalProperties": False,
}
GRAMMAR = 'start: "(" NUM ")"\nNUM: /[0-9]{1,3}/\n'


def post(server, path: str, body, **kwargs) -> httpx2.Response:
    content = body if isinstance(body, bytes | str) else json.dumps(body)
    return httpx2.post(f"{http_url(server)}{path}", content=content, timeout=60, **kwargs)


def sse_events(text: str) -> list:
    """A server-sent event stream's `data:` payloads, in order ("[DONE]" as the string)."""
    assert text.endswith("\n\n"), text[-200:]
    events = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: ") and "\n" not in block, block
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def error_of(answer: httpx2.Response | tuple[int, bytes], status: int) -> dict:
    """The `error` object of an answer in OpenAI's shape, after checking the status and the shape."""
    code, raw = (answer.status_code, answer.content) if isinstance(answer, httpx2.Response) else answer
    assert code == status, raw[:500]
    body = json.loads(raw)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# -- structured output: vLLM's guided_* extensions -------------------------------------------------

def compact_json(text: str) -> None:
    value = json.loads(text)
    assert set(value) == {"ok", "label"} and isinstance(value["ok"], bool) and value["label"] in ("cat", "dog")
    assert text == json.dumps(value, separators=(",", ":")), "one JSON value, no whitespace between tokens"


def parenthesised_number(text: str) -> None:
    assert re.fullmatch(r"\([0-9]{1,3}\)", text), text


def digits(text: str) -> None:
    assert re.fullmatch("[0-9]{1,6}", text), text


def one_choice(text: str) -> None:
    assert text in ("yes", "no", "maybe so"), text


GUIDED = [  # (extension field, its value, the gRPC request's equivalent `output`, what the text must be)
    ("guided_json", SCHEMA, {"json_schema": json.dumps(SCHEMA)}, compact_json),
    ("guided_json", json.dumps(SCHEMA), {"json_schema": json.dumps(SCHEMA)}, compact_json),  # JSON text works too
    ("guided_grammar", GRAMMAR, {"grammar": GRAMMAR}, parenthesised_number),
    ("guided_regex", "[0-9]{1,6}", {"regex": "[0-9]{1,6}"}, digits),
    ("guided_choice", ["yes", "no", "maybe so"], {"choice": ["yes", "no", "maybe so"]}, one_choice),
]


@pytest.mark.parametrize(("field", "value", "output", "form"), GUIDED,
                         ids=["json-object", "json-text", "grammar", "regex", "choice"])
def test_guided_extensions_give_the_grpc_ports_constrained_greedy_output(http_server, field, value, output, form):
    with openai_client(http_server) as client, http_server.client() as grpc_client:
        for model, adapter in (("alpha", "alpha"), ("beta", "beta"), ("base:llama", "")):
            want = grpc_client.generate(adapter, PROMPT, max_new_tokens=48, **output)
            assert want.finish_reason == generation_pb2.STOP
            form(want.text)
            got = client.completions.create(model=model, prompt=PROMPT, max_tokens=48, temperature=0,
                                            extra_body={field: value})
            assert got.choices[0].text == want.text, (model, field)
            assert got.choices[0].finish_reason == "stop"
            assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (
                want.usage.prompt_tokens, len(want.token_ids))
            chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=48, temperature=0,
                                                    stream=True, extra_body={field: value}))
            assert "".join(c.choices[0].text for c in chunks) == want.text
            assert [c.choices[0].finish_reason for c in chunks][-1] == "stop"

        messages = [{"role": "user", "content": "Is it raining?"}]
        want = grpc_client.generate("gamma", chat_prompt(messages), max_new_tokens=48, **output)
        chat = client.chat.completions.create(model="gamma", messages=messages, max_tokens=48, temperature=0,
                                              extra_body={field: value})
        assert chat.choices[0].message.content == want.text and chat.choices[0].finish_reason == "stop"
        form(chat.choices[0].message.content)


def test_a_guided_grammar_that_does_not_compile_is_400_naming_the_field(http_server):
    error = error_of(post(http_server, "/v1/completions",
                          {"model": "alpha", "prompt": PROMPT, "guided_grammar": "start: undefined_rule"}), 400)
    assert error["param"] == "guided_grammar" and error["code"] == "INVALID_ARGUMENT", error
    error = error_of(post(http_server, "/v1/completions",
                          {"model": "alpha", "prompt": PROMPT, "guided_json": {"type": "no-such-type"}}), 400)
    assert error["param"] == "guided_json" and error["code"] == "INVALID_ARGUMENT", error


# -- x-request-id -------------------------------------------------------------------------------

class RecordingEngine:
    """Submits to the server's engine, recording each job's request id."""

    def __init__(self, engine):
        self._engine, self.ids = engine, []

    def submit(self, job) -> None:
        self.ids.append(job.request_id)
        self._engine.submit(job)

    def __getattr__(self, name: str):
        return getattr(self._engine, name)


@pytest.fixture
def recorded(http_server):
    service = http_server.running.service
    recorder = RecordingEngine(service.engine)
    service.engine = recorder
    try:
        yield recorder
    finally:
        service.engine = recorder._engine


def test_x_request_id_is_echoed_and_is_the_requests_id(http_server, recorded):
    body = {"model": "alpha", "prompt": PROMPT, "max_tokens": 3, "temperature": 0}
    answer = post(http_server, "/v1/completions", body, headers={"x-request-id": "trace-7f3a"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-request-id"] == "trace-7f3a"
    done = answer.json()
    assert done["id"] == "cmpl-trace-7f3a" and done["loraplex"]["request_id"] == "trace-7f3a"

    chat = post(http_server, "/v1/chat/completions",
                {"model": "beta", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0},
                headers={"x-request-id": "chat-1"})
    assert chat.headers["x-request-id"] == "chat-1" and chat.json()["id"] == "chatcmpl-chat-1"

    longest = "r" * 128  # request ids are at most 128 printable characters, as on gRPC
    streamed = post(http_server, "/v1/completions", {**body, "stream": True}, headers={"x-request-id": longest})
    assert streamed.status_code == 200 and streamed.headers["x-request-id"] == longest
    events = sse_events(streamed.text)
    assert events[-1] == "[DONE]"
    assert {e["id"] for e in events[:-1]} == {f"cmpl-{longest}"}
    assert events[-2]["loraplex"]["request_id"] == longest
    assert recorded.ids == ["trace-7f3a", "chat-1", longest]  # the engine job carries the client's id


def test_without_x_request_id_one_is_made_and_returned(http_server, recorded):
    body = {"model": "alpha", "prompt": PROMPT, "max_tokens": 2, "temperature": 0}
    made = []
    for headers in ({}, {"x-request-id": ""}):
        answer = post(http_server, "/v1/completions", body, headers=headers)
        assert answer.status_code == 200, answer.text
        rid = answer.headers["x-request-id"]
        assert re.fullmatch("[0-9a-f]{16}", rid), rid
        assert answer.json()["id"] == f"cmpl-{rid}" and answer.json()["loraplex"]["request_id"] == rid
        made.append(rid)
    assert made[0] != made[1]
    assert recorded.ids == made


def test_an_x_request_id_over_128_characters_is_refused(http_server, recorded):
    answer = post(http_server, "/v1/completions", {"model": "alpha", "prompt": PROMPT, "max_tokens": 2},
                  headers={"x-request-id": "r" * 129})
    error = error_of(answer, 400)
    assert error["code"] == "INVALID_ARGUMENT" and "request_id must be at most 128" in error["message"], error
    assert recorded.ids == []


# -- an engine failure after the stream started ---------------------------------------------------

class BreakingSink:
    """The request layer's sink, raising at the job's 3rd token (what a bug in it would do)."""

    def __init__(self, sink):
        self._sink, self._seen = sink, 0

    def on_output(self, output) -> None:
        self._seen += len(output.tokens)
        if output.tokens and self._seen >= 3:
            raise RuntimeError("injected: the sink of this request broke")
        self._sink.on_output(output)


class PoisoningEngine:
    """Submits to the server's engine; the job with request id "poisoned" gets a breaking sink."""

    def __init__(self, engine):
        self._engine = engine

    def submit(self, job) -> None:
        if job.request_id == "poisoned":
            job.sink = BreakingSink(job.sink)
        self._engine.submit(job)

    def __getattr__(self, name: str):
        return getattr(self._engine, name)


@pytest.fixture
def poisoned(http_server):
    """The server's engine, with the job whose request id is "poisoned" failing at its 3rd token (after
    two tokens went out), as tests/runtime/test_isolation.py injects failures."""
    service = http_server.running.service
    service.engine = PoisoningEngine(service.engine)
    try:
        yield service
    finally:
        service.engine = service.engine._engine


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_a_stream_whose_job_fails_ends_with_one_error_event_then_done(http_server, poisoned, kind):
    messages = [{"role": "user", "content": "hello"}]
    with http_server.client() as grpc_client:
        prompt = PROMPT if kind == "completion" else chat_prompt(messages)
        before = grpc_client.generate("alpha", prompt, max_new_tokens=2, ignore_eos=True).text  # what 2 tokens say
    body = {"model": "alpha", "max_tokens": 12, "temperature": 0, "ignore_eos": True, "stream": True}
    path = "/v1/completions" if kind == "completion" else "/v1/chat/completions"
    body.update({"prompt": PROMPT} if kind == "completion" else {"messages": messages})

    answer = post(http_server, path, body, headers={"x-request-id": "poisoned"})
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
    events = sse_events(answer.text)
    assert events[-2:] == [{"error": {
        "message": "the engine failed on request poisoned: injected: the sink of this request broke",
        "type": "server_error", "param": None, "code": "INTERNAL"}}, "[DONE]"]
    chunks = events[:-2]
    assert all("error" not in c and c["choices"][0]["finish_reason"] is None for c in chunks), chunks
    if kind == "completion":
        text = "".join(c["choices"][0]["text"] for c in chunks)
    else:
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == before  # the two tokens decoded before the failure were sent, nothing after

    wait_until(lambda: poisoned.in_flight == 0, what="no request in flight")
    assert all(v.leases == 0 for v in http_server.running.registry.versions())
    again = post(http_server, path, body, headers={"x-request-id": "healthy"})
    assert sse_events(again.text)[-1] == "[DONE]" and "error" not in again.text


def test_the_openai_client_raises_the_mid_stream_error(http_server, poisoned):
    with openai_client(http_server) as client:
        stream = client.completions.create(model="beta", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True}, extra_headers={"x-request-id": "poisoned"})
        with pytest.raises(openai.APIError) as err:
            list(stream)
    assert err.value.message == "the engine failed on request poisoned: injected: the sink of this request broke"
    assert err.value.body["code"] == "INTERNAL"


# -- request bodies over 4 MiB --------------------------------------------------------------------

def raw_request(server, path: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, bytes]:
    """Send `headers` and `body` as they are (no completing the body), then read the answer."""
    url = urlsplit(http_url(server))
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        connection.putrequest("POST", path)
        for name, value in {"content-type": "application/json", **headers}.items():
            connection.putheader(name, value)
        connection.endheaders()
        if body:
            connection.send(body)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def padded_body(size: int) -> bytes:
    """A completion request of exactly `size` bytes (its prompt padded)."""
    head, tail = b'{"model": "alpha", "max_tokens": 1, "prompt": "', b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_body_declared_over_4_mib_is_400_before_it_is_read(http_server, path):
    error = error_of(raw_request(http_server, path, {"content-length": str(MAX_BODY + 1)}), 400)
    assert error == {"message": f"the request body is {MAX_BODY + 1} bytes; at most {MAX_BODY} are accepted",
                     "type": "invalid_request_error", "param": None, "code": "INVALID_ARGUMENT"}


def test_a_chunked_body_over_4_mib_is_400(http_server):
    """No content-length: the body is counted as it arrives and refused at its 4 MiB + 1st byte (sent
    as one chunk, the terminating chunk held back, so the server has read every byte when it answers)."""
    data = padded_body(MAX_BODY + 1)
    chunk = f"{len(data):x}\r\n".encode() + data + b"\r\n"
    error = error_of(raw_request(http_server, "/v1/completions", {"transfer-encoding": "chunked"}, chunk), 400)
    assert error == {"message": f"the request body is over {MAX_BODY} bytes; shorten it",
                     "type": "invalid_request_error", "param": None, "code": "INVALID_ARGUMENT"}


def test_a_body_of_exactly_4_mib_is_read(http_server):
    """At the limit the body is parsed: what refuses it is the prompt's own bound, not the body's."""
    body = padded_body(MAX_BODY)
    assert len(body) == MAX_BODY
    error = error_of(post(http_server, "/v1/completions", body), 400)
    assert error["code"] == "INVALID_ARGUMENT" and "--max-prompt-bytes" in error["message"], error
    assert "request body" not in error["message"]
    with openai_client(http_server) as client:  # and the server keeps serving
        assert client.completions.create(model="alpha", prompt=PROMPT, max_tokens=2).usage.completion_tokens <= 2


# -- fields loraplex does not serve --------------------------------------------------------------

REFUSED = [
    ("/v1/completions", "best_of", 2, "best_of=2 is not supported: loraplex decodes one sequence per request"),
    ("/v1/completions", "logit_bias", {"50": -100}, 'logit_bias={"50": -100} is not supported: loraplex does not '
                                                    "bias logits"),
    ("/v1/completions", "suffix", "!", 'suffix="!" is not supported: loraplex does not insert text'),
    ("/v1/chat/completions", "logit_bias", {"50": 5}, 'logit_bias={"50": 5} is not supported: loraplex does not '
                                                      "bias logits"),
]


@pytest.mark.parametrize(("path", "field", "value", "message"), REFUSED,
                         ids=["best_of", "logit_bias", "suffix", "chat-logit_bias"])
def test_best_of_logit_bias_and_suffix_are_refused_naming_the_field(http_server, path, field, value, message):
    body = {"model": "alpha", "max_tokens": 2, field: value}
    body.update({"prompt": PROMPT} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]})
    error = error_of(post(http_server, path, body), 400)
    assert error == {"message": message, "type": "invalid_request_error", "param": field, "code": "INVALID_ARGUMENT"}


def test_their_no_op_values_are_accepted_and_change_nothing(http_server):
    body = {"model": "alpha", "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    want = post(http_server, "/v1/completions", body).json()["choices"][0]["text"]
    for field, value in (("best_of", 1), ("logit_bias", {}), ("suffix", ""), ("suffix", None)):
        answer = post(http_server, "/v1/completions", {**body, field: value})
        assert answer.status_code == 200, (field, answer.text)
        assert answer.json()["choices"][0]["text"] == want
    chat = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "logit_bias": {}}
    assert post(http_server, "/v1/chat/completions", chat).status_code == 200


def test_the_openai_client_gets_the_refusal_as_bad_request(http_server):
    with openai_client(http_server) as client:
        for field, value in (("best_of", 3), ("suffix", " the end"), ("logit_bias", {"7": 1})):
            with pytest.raises(openai.BadRequestError) as err:
                client.completions.create(model="alpha", prompt=PROMPT, max_tokens=2, **{field: value})
            assert err.value.status_code == 400 and err.value.param == field and err.value.code == "INVALID_ARGUMENT"
