"""PEFT adapter -> .onnx_adapter: equal to what Olive extracts, its own modules at its own rank, scaling exact."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from loraplex.adapters.export.base_graph import build_lora_model, extract_adapters
from loraplex.adapters.export.convert import IncompatibleAdapter, adapter_tensors, convert_adapter
from loraplex.adapters.export.peft_adapter import AdapterError, load_peft_adapter
from loraplex.adapters.package.lora_inputs import read_lora_inputs

from tests.fixtures.packages import ALL_LLAMA

PHI3_ALL = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@pytest.mark.parametrize("architecture", ["llama", "phi3"])
def test_converter_file_is_byte_identical_to_olive_extraction(architecture, tiny_base, tiny_base_factory,
                                                              random_adapter_factory, tmp_path):
    """Build a graph from the adapter itself (builder + ExtractAdapters): Olive's adapter file and
    the converter's must be the same bytes. Phi-3 covers the fused qkv/gate_up split."""
    base = tiny_base if architecture == "llama" else tiny_base_factory(architecture)
    targets = ALL_LLAMA if architecture == "llama" else PHI3_ALL
    adapter_dir = random_adapter_factory(base, f"olive_{architecture}", 8, targets, seed=11)
    built = build_lora_model(base, adapter_dir, tmp_path / "built", tmp_path)
    extracted = extract_adapters(built, tmp_path / "extracted", tmp_path)
    olive_file = extracted.parent / "adapter_weights.onnx_adapter"

    graph = read_lora_inputs(extracted)
    ours = convert_adapter(load_peft_adapter(adapter_dir), graph, tmp_path / "ours.onnx_adapter")
    assert len(graph.inputs) == 4 * 7 * 2  # q, k, v, o, gate, up, down in every layer, A and B
    assert ours.read_bytes() == olive_file.read_bytes()


def _peft(adapter_dir):
    from safetensors.numpy import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def test_a_file_holds_the_adapters_own_modules_at_its_own_rank_scaled(tiny_package, tiny_base,
                                                                        random_adapter_factory):
    """alpha (r=4, q/v, lora_alpha=8) in a graph covering every projection: only q and v, A^T and alpha/r * B^T."""
    graph = read_lora_inputs(tiny_package / "model.onnx")
    adapter_dir = random_adapter_factory(tiny_base, "alpha", 4, ("q_proj", "v_proj"), 1,
                                         template={"prompt": "Review: {text}\nSentiment:", "completion": " {label}"})
    tensors = adapter_tensors(load_peft_adapter(adapter_dir), graph)
    peft = _peft(adapter_dir)
    assert list(tensors) == [n for n in graph.names if ".q_proj." in n or ".v_proj." in n]  # graph order
    a = peft["base_model.model.model.layers.2.self_attn.v_proj.lora_A.weight"]  # [4, 128]
    b = peft["base_model.model.model.layers.2.self_attn.v_proj.lora_B.weight"]  # [64, 4]
    got_a = tensors["model.layers.2.attn.v_proj.lora_A.MatMul.weight"]
    got_b = tensors["model.layers.2.attn.v_proj.lora_B.MatMul.weight"]
    np.testing.assert_array_equal(got_a, a.T)
    np.testing.assert_array_equal(got_b, (b * 2.0).T)  # lora_alpha 8 / r 4


def test_rslora_scales_by_alpha_over_sqrt_rank(tiny_base, random_adapter_factory, tiny_package):
    adapter_dir = random_adapter_factory(tiny_base, "rs", 4, ("o_proj",), 5, alpha=6, rslora=True)
    adapter = load_peft_adapter(adapter_dir)
    assert adapter.rslora and adapter.modules["model.layers.0.self_attn.o_proj"].scaling == 6 / math.sqrt(4)
    tensors = adapter_tensors(adapter, read_lora_inputs(tiny_package / "model.onnx"))
    b = _peft(adapter_dir)["base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight"]
    np.testing.assert_array_equal(tensors["model.layers.0.attn.o_proj.lora_B.MatMul.weight"], (b * 3.0).T)


def test_any_rank_fits_the_graph_and_a_module_it_lacks_is_refused(tiny_base, random_adapter_factory, tiny_package):
    from loraplex.adapters.package.lora_inputs import LoraInputs

    graph = read_lora_inputs(tiny_package / "model.onnx")
    adapter = load_peft_adapter(random_adapter_factory(tiny_base, "big", 32, ("q_proj",), 6))
    big = adapter_tensors(adapter, graph)
    assert {t.shape for n, t in big.items() if ".lora_A." in n} == {(128, 32)}  # above every rank the graph saw
    mlp_only = LoraInputs(tuple(i for i in graph.inputs if i.projection in ("gate_proj", "up_proj", "down_proj")))
    with pytest.raises(IncompatibleAdapter, match="no LoRA input .*q_proj.*re-export the package"):
        adapter_tensors(adapter, mlp_only)


def test_bad_adapter_directories_are_named(tmp_path, tiny_base, random_adapter_factory):
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        load_peft_adapter(tmp_path)
    src = random_adapter_factory(tiny_base, "alpha", 4, ("q_proj", "v_proj"), 1)
    cases = [
        ("peft_type", "IA3", "only LoRA adapters"),
        ("use_dora", True, "use_dora=true"),
        ("modules_to_save", ["lm_head"], "full copies of lm_head .modules_to_save.*retrain without"),
        ("target_modules", ["q_proj", "embed_tokens"], "LoRA on embed_tokens: only the attention and MLP"),
    ]
    for key, value, message in cases:
        bad = tmp_path / key
        bad.mkdir()
        config = json.loads((src / "adapter_config.json").read_text())
        config[key] = value
        (bad / "adapter_config.json").write_text(json.dumps(config))
        (bad / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
        with pytest.raises(AdapterError, match=message):
            load_peft_adapter(bad)
    (tmp_path / "peft_type" / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="no adapter_model.safetensors"):
        load_peft_adapter(tmp_path / "peft_type")


def test_an_embedding_lora_tensor_is_named(tmp_path, tiny_base, random_adapter_factory):
    """A LoRA on the embedding (PEFT's lora_embedding_A/B) cannot be a projection's graph input."""
    from safetensors.numpy import save_file

    src = random_adapter_factory(tiny_base, "alpha", 4, ("q_proj", "v_proj"), 1)
    bad = tmp_path / "embedding"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    tensors = dict(_peft(src))
    tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = np.zeros((4, 16), np.float32)
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="is an embedding/LM-head LoRA weight"):
        load_peft_adapter(bad)


def test_olive_telemetry_is_off_before_any_event():
    """Olive would queue a heartbeat and, offline, hold the process ~10 s at exit (see base_graph).
    Fresh interpreter: Olive's telemetry is a process-wide singleton."""
    import subprocess
    import sys

    code = (
        "import os\nfrom loraplex.adapters.export.base_graph import silence_olive_telemetry\n"
        "silence_olive_telemetry()\n"
        "from olive.telemetry import Telemetry; t = Telemetry()\n"
        "print(t._logger is None or t._logger._logger.disabled, t._cache_handler._events_logged, os.environ.get('CI'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["True", "0", "None"]  # disabled, no heartbeat queued, CI restored
