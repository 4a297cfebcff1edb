"""`loraplex adapters export-gguf`: a PEFT adapter as a llama.cpp LoRA GGUF, read back with gguf's reader.

The q/k permutation is checked against a reference computed here independently, row by row from
the RoPE layouts (HF: rotate-half, a head's first half pairs with its second; GGML: interleaved
pairs), not with the converter's reshape.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from loraplex.adapters.export.gguf_lora import GgufBase, GgufExportError, export_gguf_lora
from loraplex.runtime.app.cli import main
from safetensors.numpy import load_file

from tests.fixtures.packages import ALL_LLAMA

GGUF_MODULE = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
               "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
SECTION = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def interleaved_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """GGML row j of head h is HF row h*d + j//2 + (j%2)*d/2 (d = rows per head)."""
    d = weight.shape[0] // heads
    order = [h * d + j // 2 + (j % 2) * (d // 2) for h in range(heads) for j in range(d)]
    return weight[order]


def read_gguf(path):
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {t.name: (np.array(t.data), [int(n) for n in t.shape], t.tensor_type.name) for t in reader.tensors}
    return fields, tensors


def peft(adapter_dir):
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    return config, load_file(str(adapter_dir / "adapter_model.safetensors"))


def test_round_trip_llama(tiny_base, random_adapter_factory, tmp_path, capsys):
    adapter = random_adapter_factory(tiny_base, "beta", 8, ALL_LLAMA, 2)
    out = tmp_path / "beta.gguf"
    assert main(["adapters", "export-gguf", f"beta={adapter}", "--out", str(out), "--base", str(tiny_base)]) == 0
    assert "wrote" in capsys.readouterr().out

    fields, tensors = read_gguf(out)
    config, weights = peft(adapter)
    hf = json.loads((tiny_base / "config.json").read_text())
    heads = {"q_proj": hf["num_attention_heads"], "k_proj": hf["num_key_value_heads"]}
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora" and fields["general.name"] == "beta"
    assert fields["adapter.lora.alpha"] == pytest.approx(config["lora_alpha"])
    assert len(tensors) == 2 * len(ALL_LLAMA) * hf["num_hidden_layers"]
    for layer in range(hf["num_hidden_layers"]):
        for module in ALL_LLAMA:
            key = f"base_model.model.model.layers.{layer}.{SECTION[module]}.{module}"
            a, b = weights[f"{key}.lora_A.weight"], weights[f"{key}.lora_B.weight"]
            name = f"blk.{layer}.{GGUF_MODULE[module]}.weight"
            got_a, ne_a, type_a = tensors[f"{name}.lora_a"]
            got_b, ne_b, _ = tensors[f"{name}.lora_b"]
            want_b = interleaved_rows(b, heads[module]) if module in heads else b
            assert type_a == "F32" and ne_a == [a.shape[1], a.shape[0]] and ne_b == [b.shape[1], b.shape[0]]
            np.testing.assert_array_equal(got_a, a)
            np.testing.assert_array_equal(got_b, want_b)
            if module in heads:  # the permutation moves rows: a check that it was applied at all
                assert not np.array_equal(got_b, b)


def test_rslora_folds_the_scale_into_b(tiny_base, random_adapter_factory, tmp_path):
    adapter = random_adapter_factory(tiny_base, "rs", 4, ("q_proj", "v_proj"), 5, alpha=8, rslora=True)
    out = export_gguf_lora(adapter, tmp_path / "rs.gguf", GgufBase.from_base_dir(tiny_base))
    fields, tensors = read_gguf(out)
    _, weights = peft(adapter)
    assert fields["adapter.lora.alpha"] == 0.0  # llama.cpp then applies the user's scale as is
    b = weights["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    np.testing.assert_allclose(tensors["blk.1.attn_v.weight.lora_b"][0], b * 8 / np.sqrt(4), rtol=1e-6)


def test_f16_and_unpermuted_architectures(tiny_base, random_adapter_factory, tmp_path):
    adapter = random_adapter_factory(tiny_base, "alpha", 4, ("q_proj", "v_proj"), 1)
    _, weights = peft(adapter)
    b = weights["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    f16 = export_gguf_lora(adapter, tmp_path / "a16.gguf", GgufBase.from_base_dir(tiny_base), dtype="f16")
    _, tensors = read_gguf(f16)
    got, _, kind = tensors["blk.0.attn_q.weight.lora_b"]
    assert kind == "F16"
    np.testing.assert_allclose(got.astype(np.float32), interleaved_rows(b, 4), atol=1e-3)
    qwen = export_gguf_lora(adapter, tmp_path / "q.gguf", GgufBase("qwen2", 4, 4, 2))  # NEOX RoPE: no permutation
    fields, tensors = read_gguf(qwen)
    assert fields["general.architecture"] == "qwen2"
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight.lora_b"][0], b)


def test_refusals(tiny_base, random_adapter_factory, tmp_path, capsys):
    with pytest.raises(GgufExportError, match="model_type 'gpt2'"):
        GgufBase.from_hf_config({"model_type": "gpt2", "num_hidden_layers": 2, "num_attention_heads": 2}, "x")
    adapter = random_adapter_factory(tiny_base, "alpha", 4, ("q_proj", "v_proj"), 1)
    with pytest.raises(GgufExportError, match=r"adapts layer \d+ but the base has 2 layers"):
        export_gguf_lora(adapter, tmp_path / "x.gguf", GgufBase("llama", 2, 4, 2))
    assert not (tmp_path / "x.gguf").exists()
    assert main(["adapters", "export-gguf", f"a={adapter}", "--out", str(tmp_path / "y.gguf"),
                 "--base", str(tmp_path)]) == 2
    assert "config.json not found" in capsys.readouterr().err
