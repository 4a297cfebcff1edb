"""int4 base with float LoRA branches, fp16 for GPU targets, provider settings per device."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import pytest
from loraplex.adapters.export import export_package
from loraplex.adapters.export.convert import adapter_tensors
from loraplex.adapters.export.device_target import export_provider, write_provider
from loraplex.adapters.export.parity import OnnxDecoder
from loraplex.adapters.export.peft_adapter import load_peft_adapter
from loraplex.adapters.package.adapter_file import write_adapter_file
from loraplex.adapters.package.lora_inputs import read_lora_inputs
from loraplex.adapters.package.manifest import Manifest

from tests.fixtures.packages import TINY_SPEC


def _node(model, name: str) -> onnx.NodeProto:
    return next(n for n in onnx.load(str(model), load_external_data=False).graph.node if n.name == name)


def _ops(model_path) -> dict[str, str]:
    return {n.name: n.op_type for n in onnx.load(str(model_path), load_external_data=False).graph.node}


def test_int4_base_keeps_lora_in_float_and_any_rank_loads(package_factory, tiny_package, tiny_base,
                                                          random_adapter_factory, tmp_path):
    package = package_factory(TINY_SPEC, precision="int4")
    ops = _ops(package / "model.onnx")
    assert ops["/model/layers.0/attn/q_proj/MatMul_Q4"] == "MatMulNBits"  # base projection quantized
    assert ops["/lm_head/MatMul_Q8"] == "MatMulNBits"  # the LM head in int8 (loraplex's default)
    q_proj = _node(package / "model.onnx", "/model/layers.0/attn/q_proj/MatMul_Q4")
    assert len(q_proj.input) == 4 and "zero_points" in q_proj.input[3]  # asymmetric
    assert ops["/model/layers.0/attn/q_proj/lora_A/MatMul"] == "MatMul"  # LoRA branch float
    assert ops["/model/layers.3/mlp/down_proj/lora_B/MatMul"] == "MatMul"
    assert {i.dtype for i in read_lora_inputs(package / "model.onnx").inputs} == {np.dtype("float32")}
    assert (package / "model.onnx.data").stat().st_size < (tiny_package / "model.onnx.data").stat().st_size / 2

    m = Manifest.load(package)
    assert m.precision == "int4" and m.lora_rank == 16
    for entry in [*m.adapters.values(), m.base_parity]:
        parity = getattr(entry, "parity", entry)
        assert parity.reference.startswith("pytorch") and parity.passed and parity.tolerance is None
        assert parity.max_abs_logit_diff > 0  # quantized: recorded, not required to be small

    # The rank is not baked in: a rank-4 file and the same weights zero-padded to rank 16 agree.
    alpha = load_peft_adapter(random_adapter_factory(tiny_base, "alpha", 4, ("q_proj", "v_proj"), 1))
    tensors = adapter_tensors(alpha, read_lora_inputs(package / "model.onnx"))
    padded = {name: np.pad(t, ((0, 0), (0, 12)) if ".lora_A." in name else ((0, 12), (0, 0)))
              for name, t in tensors.items()}
    decoder = OnnxDecoder(package)
    decoder.load("r4", write_adapter_file(tensors, tmp_path / "alpha_r4.onnx_adapter"))
    decoder.load("r16", write_adapter_file(padded, tmp_path / "alpha_r16.onnx_adapter"))
    ids = decoder.encode(m.adapters["alpha"].parity.prompts[0])
    r4, r16 = decoder.greedy(ids, "r4"), decoder.greedy(ids, "r16")
    assert r4.tokens == r16.tokens == m.adapters["alpha"].parity.tokens[0]
    np.testing.assert_allclose(r4.logits, r16.logits, atol=1e-4)


def test_fp16_gpu_package(tiny_base, random_adapter_factory, tmp_path):
    adapters = {name: random_adapter_factory(tiny_base, name, rank, targets, seed)
                for name, rank, targets, seed in TINY_SPEC[:2]}
    m = export_package(tiny_base, adapters, tmp_path / "pkg", precision="fp16", device="gpu", progress=False)
    pkg = tmp_path / "pkg"
    config = json.loads((pkg / "genai_config.json").read_text())
    assert config["model"]["decoder"]["session_options"]["provider_options"] == [{"cuda": {}}]
    assert (m.device, m.provider, m.precision) == ("gpu", "cuda", "fp16")
    assert {i.dtype for i in read_lora_inputs(pkg / "model.onnx").inputs} == {np.dtype("float16")}
    import onnxruntime as ort

    params = ort.AdapterFormat.read_adapter(str(pkg / m.adapters["beta"].file)).get_parameters()
    assert {v.data_type() for v in params.values()} == {"tensor(float16)"}
    # No GPU here: the graph is checked by running it on CPU against PyTorch (recorded, not required).
    for parity in [m.adapters["alpha"].parity, m.adapters["beta"].parity, m.base_parity]:
        assert parity.reference.startswith("pytorch") and parity.tolerance is None
        assert 0 < parity.max_abs_logit_diff < 0.1  # fp16 is close


def test_device_targets_and_provider_warnings(tmp_path, caplog):
    assert export_provider("cpu") is None
    assert export_provider("gpu") == "cuda"
    with caplog.at_level(logging.WARNING):
        assert export_provider("gpu", "dml") == "dml"
        assert export_provider("npu") == "qnn"
    assert "DirectML cannot load LoRA adapters" in caplog.text and "EP-context" in caplog.text
    with pytest.raises(ValueError, match="--provider cuda needs --device gpu, not npu"):
        export_provider("npu", "cuda")
    with pytest.raises(ValueError, match="device 'tpu' is unknown"):
        export_provider("tpu")
    config = tmp_path / "genai_config.json"
    config.write_text(json.dumps({"model": {"decoder": {"session_options": {"provider_options": []}}}}))
    write_provider(config, "qnn")
    assert list(json.loads(config.read_text())["model"]["decoder"]["session_options"]["provider_options"][0]) == ["qnn"]


def test_bad_precision_and_device_are_refused(tiny_base, tmp_path):
    with pytest.raises(ValueError, match="fp16 needs a GPU target"):
        export_package(tiny_base, {"a": tmp_path}, tmp_path / "x", precision="fp16", device="cpu")
    with pytest.raises(ValueError, match="precision 'int8' is not supported"):
        export_package(tiny_base, {"a": tmp_path}, tmp_path / "x", precision="int8")
    with pytest.raises(ValueError, match="adapter name 'a b' is invalid"):
        export_package(tiny_base, {"a b": tmp_path}, tmp_path / "x")
    with pytest.raises(ValueError, match="at least one adapter"):
        export_package(tiny_base, {}, tmp_path / "x")


def test_int4_defaults_fall_back_where_the_rtn_quantizer_cannot_go(tmp_path):
    from loraplex.adapters.export.base_graph import Int4Options

    config = {"hidden_size": 576, "num_attention_heads": 9, "intermediate_size": 1536}
    (tmp_path / "config.json").write_text(json.dumps(config))
    options = Int4Options()
    assert options.for_base(tmp_path) is options  # 18 and 48 blocks per row
    assert options.extra_options() == ["block_size=32", "accuracy_level=4", "algo_config=rtn_last",
                                       "is_symmetric=false"]
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 352}))  # 11 blocks
    fallback = options.for_base(tmp_path)
    assert fallback.algo == "default" and "matmul_mixed_precision=last_matmul:int8" in fallback.extra_options()
    assert Int4Options(symmetric=True).for_base(tmp_path).algo == "rtn"  # symmetric rtn packs no zero points
    with pytest.raises(ValueError, match="int4 block size 48"):
        Int4Options(block_size=48)
