"""A real pretrained model end to end: GGUF import, a short training run, fp32 and int4 packages
whose task accuracy export verified, served on both engines with exactly what export verified."""

from __future__ import annotations

import hashlib
import json

import pytest
from loraplex.adapters.package.manifest import Manifest

from tests.fixtures.real import EVAL_RECORDS, TASK
from tests.fixtures.serving import ENGINES, ServerThread, serving_config


def test_the_imported_base_is_a_hf_directory_that_records_its_gguf(smollm2_base):
    from loraplex.trainer.base_model import base_identity
    from loraplex.trainer.gguf_import import packaged_smollm2

    identity = base_identity(smollm2_base)
    assert (identity["architecture"], identity["model_type"]) == ("LlamaForCausalLM", "llama")
    source = identity["source"]
    assert source["file"] == packaged_smollm2().name and source["architecture"] == "llama"
    assert source["sha256"] == hashlib.sha256(packaged_smollm2().read_bytes()).hexdigest()
    config = json.loads((smollm2_base / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and "quantization_config" not in config
    assert (smollm2_base / "tokenizer.json").is_file() and (smollm2_base / "chat_template.jinja").is_file()


def test_the_adapter_learns_the_task_beyond_the_base_model(real_packages):
    training = json.loads((real_packages.adapter / "training.json").read_text())
    assert training["base"]["source"]["source"] == "gguf"
    assert training["eval_exact_match"] > training["base_eval_exact_match"]


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_each_package_verified_its_task_accuracy_against_pytorch(real_packages, precision):
    manifest = Manifest.load(getattr(real_packages, precision))
    entry = manifest.adapters[TASK]
    accuracy = entry.accuracy
    assert manifest.base.imported_from["source"] == "gguf"
    assert accuracy.examples == EVAL_RECORDS and str(real_packages.eval_data) in accuracy.source
    assert accuracy.engine == "batched" and accuracy.passed and accuracy.drop <= accuracy.max_drop
    assert accuracy.package["exact_match"] > accuracy.base["exact_match"]
    if precision == "fp32":
        assert entry.parity.tokens_equal and accuracy.token_agreement == 1.0
        assert accuracy.package == accuracy.pytorch
    assert entry.size_bytes < 1.05 * entry.peft_size_bytes  # q,v at rank 8: no padding


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_the_server_answers_exactly_what_export_verified(real_packages, precision, engine):
    from loraplex.adapters.package.genai_config import GenaiConfig
    from loraplex.trainer.dataset import read_records
    from loraplex.v1 import generation_pb2

    package = getattr(real_packages, precision)
    eos = set(GenaiConfig.load(package).eos_token_ids)
    manifest = Manifest.load(package)
    entry = manifest.adapters[TASK]
    assert entry.output["kind"] == "choice" and sorted(entry.output["spec"]) == [" negative", " positive"]
    records = read_records(real_packages.eval_data)
    handle = ServerThread(serving_config(package, engine=engine, metrics_port=None))
    try:
        with handle.client() as client:
            for prompt, tokens in zip(entry.parity.prompts, entry.parity.tokens, strict=True):
                response = client.generate(TASK, prompt, max_new_tokens=entry.parity.max_new_tokens)
                want = tokens[:-1] if tokens and tokens[-1] in eos else tokens  # the server never sends EOS
                assert list(response.token_ids) == want, (precision, engine, prompt)
            right = 0
            for record in records:
                response = client.generate(TASK, inputs={"text": record["text"]}, max_new_tokens=8)
                # the label task's inferred contract (a choice of labels) ends a request with STOP
                ended = response.finish_reason in (generation_pb2.EOS, generation_pb2.STOP)
                right += ended and response.text == f" {record['label']}"
    finally:
        handle.stop()
    assert right / len(records) == entry.accuracy.package["exact_match"]
