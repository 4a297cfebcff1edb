import json
import shutil

import pytest
from loraplex.trainer.base_model import (
    BaseModelError,
    base_identity,
    load_base_model,
    resolve_target_modules,
    target_modules_for,
    weights_sha256,
)


def test_weights_sha256_is_deterministic_and_tracks_the_weights(tiny_base, tmp_path):
    digest = weights_sha256(tiny_base)
    assert len(digest) == 64 and digest == weights_sha256(tiny_base)
    copy = shutil.copytree(tiny_base, tmp_path / "copy")
    assert weights_sha256(copy) == digest
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")  # not a weight file
    assert weights_sha256(copy) == digest
    weights = bytearray((copy / "model.safetensors").read_bytes())
    weights[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(weights))
    assert weights_sha256(copy) != digest


def test_base_identity(tiny_base):
    identity = base_identity(tiny_base)
    assert identity == {
        "path": str(tiny_base.resolve()),
        "architecture": "LlamaForCausalLM",
        "model_type": "llama",
        "sha256": weights_sha256(tiny_base),
    }


def test_target_modules_per_architecture(tiny_base_factory):
    llama = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert target_modules_for("llama") == target_modules_for("mistral") == target_modules_for("qwen2") == llama
    assert target_modules_for("phi3") == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert resolve_target_modules(["v_proj", "q_proj"], "llama") == ["q_proj", "v_proj"]
    # The phi3 list matches the real module names of a phi3 model.
    model, _ = load_base_model(tiny_base_factory("phi3"))
    linear_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name.endswith("_proj")}
    assert linear_names == set(target_modules_for("phi3"))


def test_unknown_target_module_lists_the_valid_ones():
    message = r"'qkv_proj' does not exist in llama models; valid target modules: q_proj, k_proj"
    with pytest.raises(BaseModelError, match=message):
        resolve_target_modules(["q_proj", "qkv_proj"], "llama")


def test_directory_that_is_not_a_causal_lm_is_rejected(tmp_path):
    with pytest.raises(BaseModelError, match="does not exist"):
        base_identity(tmp_path / "missing")
    with pytest.raises(BaseModelError, match=r"not a Hugging Face model directory \(no config.json\)"):
        load_base_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(BaseModelError, match=r"not a causal language model: .*\['BertModel'\].*ForCausalLM"):
        base_identity(tmp_path)
