"""Scores over gRPC on BOTH engines: per-token log-probabilities, label probabilities (Classify) and
`n` samples of one prompt.

The reference is the package's own graph run by plain onnxruntime over the whole sequence (no KV
cache, no engine, no banked rewrite): log_softmax of its logits at every position. Each engine's
log-probabilities must equal it within 1e-3 (fp32), greedy or penalised; the two engines must agree
with each other where the reference would need the output constraint's mask."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
from loraplex.v1 import generation_pb2

from tests.fixtures.serving import ENGINES, ServerThread, serving_config

TOLERANCE = 1e-3
PROMPTS = ["Review: the movie was great\nSentiment:", "Review: dull and far too long\nSentiment:", "hello there",
           "Review: fine acting, weak plot\nSentiment:", "Translate: house\nFrench:"]
LABELS = ["A", "B", "C"]  # one byte each: a constrained reply's first token decides its label
WORD_LABELS = [" positive", " negative", " mixed feelings"]  # several tokens each


# -- the reference: the package graph, whole sequence, plain onnxruntime ---------------------------------

class Reference:
    """log_softmax of the package graph's logits at every position of a sequence, with an adapter."""

    def __init__(self, root: Path, scratch: Path):
        import onnxruntime as ort
        from loraplex.adapters.package.adapter_file import loadable_file, read_adapter_file
        from loraplex.adapters.package.reader import Package

        self.package = Package.open(root)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.package.model_path), options, providers=["CPUExecutionProvider"])
        self.adapters: dict[str, dict[str, np.ndarray]] = {"": {}}
        for name, entry in self.package.manifest.adapters.items():
            weights = read_adapter_file(root / entry.file, self.package.lora_inputs)
            padded = loadable_file(weights, self.package.lora_inputs, scratch)  # one rank over every input
            held = ort.AdapterFormat.read_adapter(str(padded))
            self.adapters[name] = {k: np.array(v.numpy(), copy=True) for k, v in held.get_parameters().items()}

    def logits(self, adapter: str, ids: list[int]) -> np.ndarray:
        """[len(ids), vocab]: row i scores the token after ids[: i + 1] (one run, no past)."""
        feeds = dict(self.adapters[adapter])
        feeds["input_ids"] = np.array([ids], dtype=np.int64)
        feeds["attention_mask"] = np.ones((1, len(ids)), dtype=np.int64)
        for value in self.session.get_inputs():
            if value.name.startswith("past_key_values."):
                feeds[value.name] = np.zeros((1, value.shape[1], 0, self.package.config.head_size), np.float32)
        return self.session.run(["logits"], feeds)[0][0]

    def logprobs(self, adapter: str, ids: list[int]) -> np.ndarray:
        """[len(ids), vocab]: row i is the distribution of the token after ids[: i + 1]."""
        from loraplex.runtime.engines.logprobs import log_softmax

        return np.stack([log_softmax(row) for row in self.logits(adapter, ids)])


@pytest.fixture(scope="module")
def reference(recipe_package, tmp_path_factory) -> Reference:
    return Reference(recipe_package, tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="module")
def label_package(tmp_path_factory, recipe_package) -> Path:
    """The recipe package with a 3-label choice contract on alpha (as export records a label task's)."""
    root = tmp_path_factory.mktemp("labels") / "package"
    shutil.copytree(recipe_package, root)
    data = json.loads((root / "manifest.json").read_text())
    data["adapters"]["alpha"]["output"] = {"kind": "choice", "spec": LABELS}
    (root / "manifest.json").write_text(json.dumps(data))
    return root


# -- log-probabilities -------------------------------------------------------------------------------

@pytest.mark.parametrize("adapter", ["", "alpha", "beta", "gamma"])
def test_logprobs_equal_log_softmax_of_the_models_logits(server, reference, adapter):
    with server.client() as client:
        for prompt in PROMPTS[:3]:
            ids = client.tokenize(adapter, prompt)
            response = client.generate(adapter, prompt, max_new_tokens=6, logprobs=5, ignore_eos=True)
            tokens = list(response.token_ids)
            assert len(response.logprobs) == len(tokens) == 6
            expected = reference.logprobs(adapter, ids + tokens)[len(ids) - 1:]
            for i, (token, scored) in enumerate(zip(tokens, response.logprobs, strict=True)):
                assert scored.token_id == token
                assert abs(scored.logprob - expected[i, token]) < TOLERANCE
                top = [(t.token_id, t.logprob) for t in scored.top]
                assert [t for t, _ in top] == list(np.argsort(-expected[i], kind="stable")[:5])
                assert all(abs(v - expected[i, t]) < TOLERANCE for t, v in top)
                assert top[0][0] == token, "greedy: the chosen token is the most likely one"


def test_logprobs_are_after_the_repetition_penalty(server, reference):
    penalty = 1.8
    with server.client() as client:
        prompt = PROMPTS[2]
        ids = client.tokenize("beta", prompt)
        response = client.generate("beta", prompt, max_new_tokens=6, logprobs=0, repetition_penalty=penalty,
                                   ignore_eos=True)
        tokens = list(response.token_ids)
        assert [s.token_id for s in response.logprobs] == tokens and not any(s.top for s in response.logprobs)
        penalised = _penalised_logprobs(reference, "beta", ids, tokens, penalty)
        assert np.allclose([s.logprob for s in response.logprobs], penalised, atol=TOLERANCE)


def _penalised_logprobs(reference: Reference, adapter: str, ids: list[int], tokens: list[int],
                        penalty: float) -> list[float]:
    from loraplex.runtime.engines.logprobs import log_softmax

    sequence = ids + tokens
    logits = reference.logits(adapter, sequence)
    out = []
    for i, token in enumerate(tokens):
        scores = logits[len(ids) - 1 + i].astype(np.float64)
        seen = np.array(sorted(set(sequence[: len(ids) + i])))
        scores[seen] = np.where(scores[seen] < 0, scores[seen] * penalty, scores[seen] / penalty)
        out.append(float(log_softmax(scores)[token]))
    return out


def test_constrained_logprobs_are_over_the_allowed_tokens_alike_on_both_engines(recipe_package):
    """Under a choice constraint the distribution is renormalised over the tokens it allows: the chosen
    token's probability is at least its unconstrained one, the alternatives are allowed tokens only,
    and both engines give the same values."""
    values = {}
    for engine in ENGINES:
        server = ServerThread(serving_config(recipe_package, engine=engine))
        with server.client() as client:
            got = []
            for prompt in PROMPTS[:3]:
                constrained = client.generate("alpha", prompt, max_new_tokens=32, logprobs=3, choice=WORD_LABELS)
                assert constrained.text in WORD_LABELS
                assert len(constrained.logprobs) == len(constrained.token_ids)
                free = client.generate("alpha", prompt, max_new_tokens=1, logprobs=0, no_default_output=True)
                assert math.exp(constrained.logprobs[0].logprob) >= 0.999 * math.exp(free.logprobs[0].logprob) \
                    or constrained.token_ids[0] != free.token_ids[0]
                assert sum(math.exp(t.logprob) for t in constrained.logprobs[0].top) <= 1 + 1e-6
                got.append([(s.token_id, s.logprob, [(t.token_id, t.logprob) for t in s.top])
                            for s in constrained.logprobs])
            values[engine] = got
        server.stop()
    for a, b in zip(values["batched"], values["genai"], strict=True):
        assert [t for t, _, _ in a] == [t for t, _, _ in b]
        for (_, x, top_x), (_, y, top_y) in zip(a, b, strict=True):
            assert abs(x - y) < TOLERANCE
            assert [t for t, _ in top_x] == [t for t, _ in top_y]
            assert np.allclose([v for _, v in top_x], [v for _, v in top_y], atol=TOLERANCE)


def test_streamed_logprobs_equal_the_unary_ones(server):
    with server.client() as client:
        unary = client.generate("gamma", PROMPTS[4], max_new_tokens=8, logprobs=2, ignore_eos=True)
        chunks = list(client.stream("gamma", PROMPTS[4], max_new_tokens=8, logprobs=2, ignore_eos=True))
        streamed = [s for c in chunks for s in c.logprobs]
        assert [s.token_id for s in streamed] == list(unary.token_ids)
        assert [s.logprob for s in streamed] == [s.logprob for s in unary.logprobs]
        assert all(len(c.logprobs) == len(c.token_ids) for c in chunks)
        plain = client.generate("gamma", PROMPTS[4], max_new_tokens=8, ignore_eos=True)
        assert not plain.logprobs and list(plain.token_ids) == list(unary.token_ids)


@pytest.mark.parametrize("value", [-1, 21])
def test_logprobs_out_of_range_are_invalid(server, value):
    with server.client() as client, pytest.raises(grpc.RpcError) as raised:
        client.generate("alpha", "hi", max_new_tokens=2, logprobs=value)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "params.logprobs" in raised.value.details()


# -- label probabilities -----------------------------------------------------------------------------

def test_classify_ranks_first_the_label_greedy_generate_returns(server_factory, label_package):
    server = server_factory(package=label_package)
    with server.client() as client:
        for prompt in PROMPTS:
            result = client.classify("alpha", prompt)
            assert sorted(x.label for x in result.labels) == sorted(LABELS)
            assert abs(sum(x.probability for x in result.labels) - 1) < 1e-9
            probabilities = [x.probability for x in result.labels]
            assert probabilities == sorted(probabilities, reverse=True)
            greedy = client.generate("alpha", prompt, max_new_tokens=4)
            assert greedy.text in LABELS and result.labels[0].label == greedy.text
            assert result.adapter == "alpha" and result.usage.prompt_tokens == len(client.tokenize("alpha", prompt))


def test_classify_logprobs_are_the_label_sequences_log_probabilities(server, reference):
    labels = [*WORD_LABELS, " pos", "A"]  # " pos" is a prefix of " positive": its EOS is scored too; "A": one token
    eos = reference.package.config.eos_token_ids[0]
    with server.client() as client:
        for prompt in PROMPTS[:3]:
            result = client.classify("beta", prompt, labels=labels)
            ids = client.tokenize("beta", prompt)
            by_label = {x.label: x for x in result.labels}
            for label in labels:
                tokens = client.tokenize("beta", label) + ([eos] if label == " pos" else [])
                expected = reference.logprobs("beta", ids + tokens)[len(ids) - 1:]
                want = sum(expected[i, t] for i, t in enumerate(tokens))
                assert by_label[label].tokens == len(tokens)
                assert abs(by_label[label].logprob - want) < TOLERANCE * len(tokens)
            logps = np.array([by_label[label].logprob for label in labels])
            want = np.exp(logps - logps.max()) / np.exp(logps - logps.max()).sum()
            assert np.allclose([by_label[label].probability for label in labels], want, atol=1e-9)


def test_classify_needs_labels_or_a_choice_contract(server):
    with server.client() as client:
        with pytest.raises(grpc.RpcError) as raised:
            client.classify("beta", "hello")
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "not a choice of labels" in raised.value.details()
        for labels in (["a", "a"], ["x" * 1025], [f"l{i}" for i in range(65)]):
            with pytest.raises(grpc.RpcError) as raised:
                client.classify("beta", "hello", labels=labels)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- n samples ---------------------------------------------------------------------------------------

def test_n_samples_are_the_requests_with_seeds_seed_plus_i(server):
    with server.client() as client:
        prompt = PROMPTS[1]
        many = client.generate("beta", prompt, max_new_tokens=8, temperature=1.0, seed=7, n=3, logprobs=0)
        assert [s.index for s in many.samples] == [0, 1, 2]
        for i, sample in enumerate(many.samples):
            one = client.generate("beta", prompt, max_new_tokens=8, temperature=1.0, seed=7 + i, logprobs=0)
            assert list(sample.token_ids) == list(one.token_ids) and sample.text == one.text
            assert sample.completion_tokens == len(one.token_ids)
            assert [x.logprob for x in sample.logprobs] == pytest.approx([x.logprob for x in one.logprobs], abs=1e-5)
        assert many.text == many.samples[0].text
        assert many.usage.completion_tokens == sum(s.completion_tokens for s in many.samples)
        greedy = client.generate("beta", prompt, max_new_tokens=8, n=2)
        assert greedy.samples[0].token_ids == greedy.samples[1].token_ids


def test_n_samples_stream_tagged_by_index(server):
    with server.client() as client:
        chunks = list(client.stream("alpha", PROMPTS[0], max_new_tokens=6, temperature=1.0, seed=3, n=2))
        for i in range(2):
            mine = [c for c in chunks if c.index == i and (c.token_ids or c.finish_reason)]
            assert mine[-1].finish_reason != generation_pb2.FINISH_REASON_UNSPECIFIED
            one = client.generate("alpha", PROMPTS[0], max_new_tokens=6, temperature=1.0, seed=3 + i)
            assert [t for c in mine for t in c.token_ids] == list(one.token_ids)
        with pytest.raises(grpc.RpcError) as raised:
            client.generate("alpha", "hi", n=17)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- the in-process API ------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_in_process_api_scores(engine, label_package, reference):
    from loraplex.runtime.api import LLM

    with LLM(label_package, engine=engine, max_batch=4) as llm:
        for prompt in PROMPTS[:3]:
            scores = llm.classify(prompt, adapter="alpha")
            assert abs(sum(x.probability for x in scores) - 1) < 1e-9
            assert scores[0].label == llm.generate(prompt, adapter="alpha", max_new_tokens=4).text
        reply = llm.generate(PROMPTS[1], adapter="gamma", max_new_tokens=5, logprobs=1, ignore_eos=True)
        ids = llm.tokenize(PROMPTS[1], adapter="gamma")
        expected = reference.logprobs("gamma", ids + reply.token_ids)[len(ids) - 1:]
        assert [x.logprob for x in reply.logprobs] == pytest.approx(
            [expected[i, t] for i, t in enumerate(reply.token_ids)], abs=TOLERANCE)
        streamed = [x for chunk in llm.stream(PROMPTS[1], adapter="gamma", max_new_tokens=5, logprobs=1,
                                              ignore_eos=True) for x in chunk.logprobs]
        assert streamed == reply.logprobs
        many = llm.samples(PROMPTS[0], n=3, adapter="beta", max_new_tokens=6, temperature=1.0, seed=5)
        for i, sample in enumerate(many):
            assert sample.token_ids == llm.generate(PROMPTS[0], adapter="beta", max_new_tokens=6, temperature=1.0,
                                                    seed=5 + i).token_ids


# -- against PyTorch PEFT (torch tier: the exported tiny package and its PEFT adapters) ----------------

@pytest.mark.parametrize("engine", ENGINES)
def test_logprobs_equal_peft_log_softmax(engine, tiny_base, tiny_package, random_adapter_factory):
    import torch
    from loraplex.adapters.export.parity import TorchDecoder
    from loraplex.runtime.api import LLM

    from tests.fixtures.packages import TINY_SPEC, TINY_TEMPLATES

    torch_model = TorchDecoder(tiny_base, None)
    for name, rank, targets, seed in TINY_SPEC:  # the very adapters the package was exported from (cached)
        torch_model.load(name, random_adapter_factory(tiny_base, name, rank, targets, seed,
                                                      template=TINY_TEMPLATES[name]))
    with LLM(tiny_package, engine=engine, max_batch=4) as llm:
        for name, *_ in TINY_SPEC:
            for prompt in PROMPTS[:2]:
                reply = llm.generate(prompt, adapter=name, max_new_tokens=6, logprobs=3, ignore_eos=True)
                ids = llm.tokenize(prompt, adapter=name)
                torch_model.model.set_adapter(name)
                with torch.no_grad():
                    sequence = torch.tensor([ids + reply.token_ids])
                    logits = torch_model.model(input_ids=sequence, attention_mask=torch.ones_like(sequence)).logits
                expected = torch.log_softmax(logits[0].double(), dim=-1).numpy()[len(ids) - 1:]
                for i, (token, scored) in enumerate(zip(reply.token_ids, reply.logprobs, strict=True)):
                    assert abs(scored.logprob - expected[i, token]) < TOLERANCE
                    assert all(abs(v - expected[i, t]) < TOLERANCE for t, v in scored.top)


def test_n_samples_share_the_prompts_prefill_through_the_prefix_cache(recipe_package):
    """Batched engine: samples 1.. start from sample 0's cached prompt blocks (its prefill runs once)."""
    from loraplex.runtime.api import LLM

    prompt = "Review: " + "a long and winding review of a film, " * 4 + "\nSentiment:"
    with LLM(recipe_package, engine="batched", max_batch=4) as llm:
        tokens = len(llm.tokenize(prompt, adapter="beta"))
        block = llm._core.engine.prefix_cache.block_tokens
        stats = llm._core.engine.prefix_cache.stats
        before = stats.tokens_reused
        many = llm.samples(prompt, n=4, adapter="beta", max_new_tokens=4, temperature=1.0, seed=1)
        assert stats.tokens_reused - before == 3 * ((tokens - 1) // block) * block
        for i, sample in enumerate(many):  # the same tokens as each sample alone
            assert sample.token_ids == llm.generate(prompt, adapter="beta", max_new_tokens=4, temperature=1.0,
                                                    seed=1 + i).token_ids


def test_a_cancelled_n_stream_stops_every_sample(server_factory):
    from tests.fixtures.serving import EngineBrake, wait_until

    # No prefix cache: the samples start together (with one, samples 1.. wait for sample 0's first output,
    # which the brake holds).
    server = server_factory(max_batch=4, max_queue=0, metrics_port=None, prefix_cache_mib=0)
    with EngineBrake(server) as brake, server.client() as client:
        brake.hold()
        stream = client.stream("alpha", "The weather today", max_new_tokens=400, n=3, temperature=1.0, seed=2)
        next(stream)  # sample 0 started
        wait_until(lambda: server.running.service.in_flight == 3, what="every sample in the engine")
        stream.cancel()
        brake.release()
        wait_until(lambda: server.running.service.in_flight == 0, what="every sample to leave the engine")
        assert server.running.registry.get("alpha").leases == 0
