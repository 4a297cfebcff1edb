"""Scores on the OpenAI-compatible HTTP port, with the official `openai` client, on both engines:
`logprobs` on completions and chat (streamed too) equal the gRPC port's (which test_scores checks
against the model's own log_softmax), `n` samples are the gRPC samples with seeds seed + i, and
POST /v1/classify gives gRPC Classify's probabilities."""

from __future__ import annotations

import json

import httpx2
import pytest

from tests.fixtures.http import chat_prompt, http_url, openai_client

PROMPT = "Review: the movie was great\nSentiment:"
MESSAGES = [{"role": "user", "content": "Say something nice"}]
TOLERANCE = 1e-5  # float32 on the wire (gRPC) against float64 (JSON): the same values


@pytest.fixture(scope="module")
def tokenizer(chat_package):
    from loraplex.runtime.server.tokenizer import FastTokenizer

    return FastTokenizer(chat_package)


def test_completion_logprobs_are_the_grpc_ones(http_server, tokenizer):
    with openai_client(http_server) as client, http_server.client() as grpc_client:
        reply = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3,
                                          extra_body={"ignore_eos": True})
        expected = grpc_client.generate("alpha", PROMPT, max_new_tokens=8, logprobs=3, ignore_eos=True)
        scores = reply.choices[0].logprobs
        assert scores.token_logprobs == pytest.approx([s.logprob for s in expected.logprobs], abs=TOLERANCE)
        # a token's own bytes, which may be part of a character (a random model emits such tokens)
        owned = [tokenizer.token_bytes(s.token_id) for s in expected.logprobs]
        texts = [b.decode("utf-8", errors="replace") for b in owned]
        assert scores.tokens == texts and b"".join(owned).decode("utf-8", errors="replace") == reply.choices[0].text
        assert scores.text_offset == [sum(len(t) for t in texts[:i]) for i in range(len(texts))]
        for top, want in zip(scores.top_logprobs, expected.logprobs, strict=True):
            wanted: dict[str, float] = {}
            for t in want.top:  # OpenAI's shape is keyed by text: tokens that read alike keep the most likely
                wanted.setdefault(tokenizer.token_bytes(t.token_id).decode("utf-8", errors="replace"), t.logprob)
            assert top == pytest.approx(wanted, abs=TOLERANCE)
        plain = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=4, temperature=0)
        assert plain.choices[0].logprobs is None


def test_chat_logprobs_are_the_grpc_ones_streamed_or_not(http_server, tokenizer):
    with openai_client(http_server) as client, http_server.client() as grpc_client:
        expected = grpc_client.generate("beta", chat_prompt(MESSAGES), max_new_tokens=6, logprobs=2,
                                        ignore_eos=True)
        reply = client.chat.completions.create(model="beta", messages=MESSAGES, max_tokens=6, temperature=0,
                                               logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
        content = reply.choices[0].logprobs.content
        assert [c.logprob for c in content] == pytest.approx([s.logprob for s in expected.logprobs], abs=TOLERANCE)
        assert [bytes(c.bytes) for c in content] == [tokenizer.token_bytes(s.token_id) for s in expected.logprobs]
        for c, want in zip(content, expected.logprobs, strict=True):
            assert [t.logprob for t in c.top_logprobs] == pytest.approx([t.logprob for t in want.top], abs=TOLERANCE)
            assert c.top_logprobs[0].token == c.token  # greedy
        streamed = client.chat.completions.create(model="beta", messages=MESSAGES, max_tokens=6, temperature=0,
                                                  logprobs=True, top_logprobs=2, stream=True,
                                                  extra_body={"ignore_eos": True})
        parts = [c for chunk in streamed for choice in chunk.choices if choice.logprobs
                 for c in choice.logprobs.content]
        assert [(c.token, c.logprob) for c in parts] == [(c.token, c.logprob) for c in content]
        completions = client.completions.create(model="beta", prompt=chat_prompt(MESSAGES), max_tokens=6,
                                                temperature=0, logprobs=1, stream=True,
                                                extra_body={"ignore_eos": True})
        values = [v for chunk in completions for choice in chunk.choices if choice.logprobs
                  for v in choice.logprobs.token_logprobs]
        assert values == pytest.approx([c.logprob for c in content], abs=TOLERANCE)


def test_n_choices_are_the_grpc_samples_with_seed_plus_i(http_server):
    with openai_client(http_server) as client, http_server.client() as grpc_client:
        reply = client.completions.create(model="gamma", prompt=PROMPT, max_tokens=6, temperature=1.0, seed=11, n=3)
        assert [c.index for c in reply.choices] == [0, 1, 2]
        for i, choice in enumerate(reply.choices):
            one = grpc_client.generate("gamma", PROMPT, max_new_tokens=6, temperature=1.0, seed=11 + i)
            assert choice.text == one.text
        assert reply.usage.completion_tokens == sum(
            len(grpc_client.generate("gamma", PROMPT, max_new_tokens=6, temperature=1.0, seed=11 + i).token_ids)
            for i in range(3))
        stream = client.chat.completions.create(model="gamma", messages=MESSAGES, max_tokens=5, temperature=1.0,
                                                seed=4, n=2, stream=True, stream_options={"include_usage": True})
        texts = {0: "", 1: ""}
        finished, usage = [], None
        for chunk in stream:
            for choice in chunk.choices:
                texts[choice.index] += choice.delta.content or ""
                if choice.finish_reason:
                    finished.append(choice.index)
            usage = chunk.usage or usage
        assert sorted(finished) == [0, 1]
        lengths = 0
        for i in range(2):
            one = grpc_client.generate("gamma", chat_prompt(MESSAGES), max_new_tokens=5, temperature=1.0, seed=4 + i)
            assert texts[i] == one.text
            lengths += len(one.token_ids)
        assert usage.completion_tokens == lengths


def test_classify_route_gives_the_grpc_probabilities(http_server):
    labels = [" positive", " negative", " so-so"]
    answer = httpx2.post(f"{http_url(http_server)}/v1/classify", timeout=60,
                         content=json.dumps({"model": "alpha", "prompt": PROMPT, "labels": labels}))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    with http_server.client() as grpc_client:
        expected = grpc_client.classify("alpha", PROMPT, labels=labels)
    assert [x["label"] for x in body["labels"]] == [x.label for x in expected.labels]
    assert [x["probability"] for x in body["labels"]] == pytest.approx([x.probability for x in expected.labels],
                                                                       abs=1e-9)
    assert body["usage"]["prompt_tokens"] == expected.usage.prompt_tokens
    refused = httpx2.post(f"{http_url(http_server)}/v1/classify", timeout=60,
                          content=json.dumps({"model": "alpha", "prompt": PROMPT}))
    assert refused.status_code == 400 and "not a choice of labels" in refused.json()["error"]["message"]
    assert refused.json()["error"]["code"] == "FAILED_PRECONDITION"


def test_no_op_logprob_fields_are_accepted(http_server):
    with openai_client(http_server) as client:
        reply = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=2, temperature=0,
                                               logprobs=False, top_logprobs=0)
        assert reply.choices[0].logprobs is None
