"""The tiny package (tests/fixtures/packages.py): layout, manifest, parity records, genai loading."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from loraplex.adapters.package.lora_inputs import read_lora_inputs
from loraplex.adapters.package.manifest import MANIFEST_NAME, Manifest, ManifestError, file_sha256
from loraplex.adapters.package.reader import Package

ALL = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_manifest_describes_the_package(tiny_package, tiny_base):
    from loraplex.trainer.base_model import base_identity

    m = Manifest.load(tiny_package)
    assert (m.precision, m.device, m.provider, m.model_file) == ("fp32", "cpu", None, "model.onnx")
    assert m.base.sha256 == base_identity(tiny_base)["sha256"]
    assert m.base.model_type == "llama" and m.base.architecture == "LlamaForCausalLM"
    assert m.lora_rank == 16  # the largest adapter rank
    assert m.lora_modules == ALL  # union of alpha (q, v), beta (all) and gamma (MLP)
    assert len(m.lora_inputs) == 4 * 7 * 2 and m.lora_inputs == sorted(m.lora_inputs)
    assert {n: (e.rank, e.target_modules) for n, e in m.adapters.items()} == {
        "alpha": (4, ["q_proj", "v_proj"]),
        "beta": (8, ALL),
        "gamma": (16, ["down_proj", "gate_proj", "up_proj"]),
    }
    for name, entry in m.adapters.items():
        path = tiny_package / entry.file
        assert entry.file == f"adapters/{name}.onnx_adapter"
        assert entry.sha256 == file_sha256(path) and entry.version == entry.sha256[:12]
        assert entry.size_bytes == path.stat().st_size
        assert entry.template is not None and "{" in entry.template["prompt"]
        assert entry.training["base"]["sha256"] == m.base.sha256
        assert 0.9 < entry.size_bytes / entry.peft_size_bytes < 1.05  # its own modules at its own rank
    # every file holds only its own modules at its own rank: three adapters, three sizes
    assert len({e.size_bytes for e in m.adapters.values()}) == 3
    assert json.loads((tiny_package / "genai_config.json").read_text())["model"]["decoder"]["session_options"][
        "provider_options"] == []


def test_parity_is_recorded_and_adapters_change_the_output(tiny_package):
    m = Manifest.load(tiny_package)
    outputs = {}
    for name, entry in m.adapters.items():
        p = entry.parity
        assert p.reference == "pytorch-peft" and p.passed and p.tokens_equal
        assert p.max_abs_logit_diff < 1e-3 and p.max_new_tokens == 8
        assert len(p.prompts) == len(p.tokens) == 3 and all(0 < len(t) <= 8 for t in p.tokens)
        outputs[name] = p.tokens
    base = m.base_parity
    assert base.reference == "pytorch" and base.tokens_equal and base.passed
    # the same generic prompts through each adapter: every adapter changes what the model says
    assert len({json.dumps(t) for t in [*outputs.values(), base.tokens]}) == 4


def test_genai_reproduces_recorded_tokens_from_padded_copies_of_the_files(tiny_package, tmp_path):
    """What the genai engine does: load each file (padded to one rank over every graph input: ONNX
    Runtime's memory planner needs that) and pick the adapter per generator."""
    import onnxruntime_genai as og
    from loraplex.adapters.package.adapter_file import loadable_file, read_adapter_file
    from loraplex.adapters.package.lora_inputs import read_lora_inputs

    m = Manifest.load(tiny_package)
    model = og.Model(str(tiny_package))
    tok = og.Tokenizer(model)
    adapters = og.Adapters(model)
    inputs = read_lora_inputs(tiny_package / m.model_file)
    for name, entry in m.adapters.items():
        weights = read_adapter_file(tiny_package / entry.file, inputs)
        assert not weights.covers(inputs) or name == "beta"  # alpha and gamma adapt some modules only
        adapters.load(str(loadable_file(weights, inputs, tmp_path)), name)

    def greedy(prompt, adapter):
        ids = tok.encode(prompt)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + 8, do_sample=False)
        gen = og.Generator(model, params)
        if adapter:
            gen.set_active_adapter(adapters, adapter)
        gen.append_tokens(ids)
        while not gen.is_done():
            gen.generate_next_token()
        return [int(t) for t in np.asarray(gen.get_sequence(0))[len(ids):]]

    for name, entry in m.adapters.items():
        assert [greedy(p, name) for p in entry.parity.prompts] == entry.parity.tokens
    assert [greedy(p, None) for p in m.base_parity.prompts] == m.base_parity.tokens


def test_parity_failure_names_adapter_prompt_and_position():
    from loraplex.adapters.export.parity import Decoded, ParityError, compare

    logits = np.zeros((3, 5), np.float32)
    same = compare("x", ["p"], [[1]], [Decoded([1, 2, 3], logits)], [Decoded([1, 2, 3], logits + 1e-5)],
                   reference="pytorch-peft", tokens_must_match=True, tolerance=1e-3)
    assert same.tokens == [[1, 2, 3]] and same.tokens_equal and same.max_abs_logit_diff == pytest.approx(1e-5)
    with pytest.raises(ParityError, match=r"adapter 'sentiment': on prompt 'Hi' the ONNX model's greedy token 2 "):
        compare("sentiment", ["Hi"], [[1]], [Decoded([1, 2, 4], logits)], [Decoded([1, 2, 3], logits)],
                reference="pytorch-peft", tokens_must_match=True, tolerance=1e-3)
    with pytest.raises(ParityError, match="exceeds tolerance"):
        compare("s", ["Hi"], [[1]], [Decoded([1], logits[:1] + 1)], [Decoded([1], logits[:1])],
                reference="onnx-fp32", tokens_must_match=False, tolerance=0.5)


def test_parity_prompts_come_from_the_task_template_and_data(tmp_path, tiny_base, random_adapter_factory):
    from loraplex.adapters.export.parity import GENERIC_PROMPTS, prompts_for
    from loraplex.adapters.export.peft_adapter import load_peft_adapter

    data = tmp_path / "reviews.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "label": "x"}) for t in ["good", "bad", "fine", "odd"]))
    src = random_adapter_factory(tiny_base, "alpha", 4, ("q_proj", "v_proj"), 1)
    training = json.loads((src / "training.json").read_text())
    adapter_dir = tmp_path / "trained"
    adapter_dir.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (adapter_dir / name).write_bytes((src / name).read_bytes())
    training.update(template={"prompt": "Review: {text}\nSentiment:", "completion": " {label}"},
                    config={"data": str(data)})  # the trainer's training.json layout
    (adapter_dir / "training.json").write_text(json.dumps(training))
    rendered = ["Review: good\nSentiment:", "Review: bad\nSentiment:", "Review: fine\nSentiment:"]
    assert prompts_for(load_peft_adapter(adapter_dir)) == rendered
    training["data"] = {"path": str(data), "records": 4}  # the trainer's dataset summary
    training["config"] = {"data": 7}  # ignored: not a path
    (adapter_dir / "training.json").write_text(json.dumps(training))
    assert prompts_for(load_peft_adapter(adapter_dir)) == rendered
    assert prompts_for(load_peft_adapter(src)) == list(GENERIC_PROMPTS)  # no data recorded


def test_export_that_diverges_fails_and_leaves_no_package(tiny_base, random_adapter_factory, tmp_path, monkeypatch):
    import pytest
    from loraplex.adapters.export import convert
    from loraplex.adapters.export.package_export import INCOMPLETE_MARKER, export_package
    from loraplex.adapters.export.parity import ParityError
    from loraplex.adapters.package.manifest import MANIFEST_NAME

    original = convert.adapter_tensors

    def unscaled_b(adapter, graph):  # a converter bug: B at half its scale
        tensors = original(adapter, graph)
        return {k: v / np.float32(2.0) if ".lora_B." in k else v for k, v in tensors.items()}

    adapter_dir = random_adapter_factory(tiny_base, "alpha", 4, ("q_proj", "v_proj"), 1)
    out = tmp_path / "pkg"
    monkeypatch.setattr(convert, "adapter_tensors", unscaled_b)
    with pytest.raises(ParityError, match="adapter 'solo'"):
        export_package(tiny_base, {"solo": adapter_dir}, out, progress=False)
    assert not (out / MANIFEST_NAME).exists() and (out / INCOMPLETE_MARKER).exists()
    monkeypatch.setattr(convert, "adapter_tensors", original)
    export_package(tiny_base, {"solo": adapter_dir}, out, verify=False, progress=False)  # the directory is reusable
    assert (out / MANIFEST_NAME).exists() and not (out / INCOMPLETE_MARKER).exists()


def test_manifest_records_the_graph_inputs_so_opening_needs_no_graph_parse(tiny_package, tmp_path):
    m = Manifest.load(tiny_package)
    assert m.schema_version == 4 and m.lora_graph_inputs is not None
    assert Package.open(tiny_package).lora_inputs == read_lora_inputs(tiny_package / m.model_file)
    copy = tmp_path / "package"
    shutil.copytree(tiny_package, copy)
    data = json.loads((copy / MANIFEST_NAME).read_text())
    data["lora_graph_inputs"][0] = ["not_a_lora_input", 64, "float32"]
    (copy / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="not_a_lora_input.*re-export"):
        Package.open(copy)
    del data["lora_graph_inputs"]  # an older manifest: the graph is parsed instead
    data["schema_version"] = 2
    (copy / MANIFEST_NAME).write_text(json.dumps(data))
    assert Package.open(copy).lora_inputs == read_lora_inputs(tiny_package / m.model_file)


def test_export_names_onnxruntime_genai_when_the_tokenizers_library_encodes_differently(tiny_package, monkeypatch,
                                                                                         tmp_path, caplog):
    from loraplex.adapters.export import tokenizer_check
    from loraplex.runtime.server.tokenizer import FastTokenizer

    assert tokenizer_check.choose_library(tiny_package) == "tokenizers"
    original = FastTokenizer.encode
    monkeypatch.setattr(FastTokenizer, "encode", lambda self, text: original(self, text) + [7] * ("中" in text))
    assert tokenizer_check.choose_library(tiny_package) == "genai"
    assert "onnxruntime-genai" in caplog.text
    copy = tmp_path / "package"
    shutil.copytree(tiny_package, copy)
    data = json.loads((copy / MANIFEST_NAME).read_text())
    data["tokenizer"] = "sentencepiece"
    (copy / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="tokenizer 'sentencepiece'"):
        Package.open(copy)
