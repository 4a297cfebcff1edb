"""Importing base models from GGUF: a tiny llama GGUF written from the tiny base comes back as the same
model (weights bit for bit, tokenizer id for id), with its file recorded; what is refused, and that
nothing half-written is left behind (the real model's import is tested in tests/e2e/test_real_model.py)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
from loraplex.runtime.app.cli import main
from loraplex.trainer.base_model import BaseModelError, base_identity
from loraplex.trainer.gguf_import import SMOLLM2_INSTALL, import_gguf, packaged_smollm2


def _gguf(path, architecture: str):
    """A metadata-only GGUF file of `architecture` (no tensors): enough to be refused."""
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tiny_llama_gguf(base, path):
    """The tiny llama base as llama.cpp's converter writes a llama GGUF: float32 tensors under GGUF names, q and
    k rows permuted for interleaved RoPE, the hyper-parameters, and the byte-level BPE tokenizer as `gpt2`."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    config = json.loads((base / "config.json").read_text())
    tokenizer = json.loads((base / "tokenizer.json").read_text())
    layers, heads, kv_heads = config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = tokenizer["model"]["vocab"]
    special = {token["id"] for token in tokenizer["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(sorted(vocab, key=vocab.get))
    kinds = gguf.TokenType.CONTROL, gguf.TokenType.NORMAL
    writer.add_token_types([kinds[0] if i in special else kinds[1] for i in range(len(vocab))])
    writer.add_token_merges([" ".join(merge) for merge in tokenizer["model"]["merges"]])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    writer.add_add_bos_token(False)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)

    def permute(weight, n_heads):  # llama.cpp's convert_hf_to_gguf: rotate-half rows -> interleaved pairs
        return weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)

    for name, value in load_file(base / "model.safetensors").items():
        value = value.astype(np.float32)
        if name.endswith("q_proj.weight"):
            value = permute(value, heads)
        elif name.endswith("k_proj.weight"):
            value = permute(value, kv_heads)
        writer.add_tensor(names.get_name(name.removesuffix(".weight")) + ".weight", value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_llama_gguf_imports_as_the_model_it_was_written_from(tiny_base, tmp_path, capsys):
    """`loraplex base import-gguf` on a GGUF of the tiny base: the same float32 weights (q and k rows
    un-permuted), the same token ids, and the file's name and sha256 in the base identity."""
    import numpy as np
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    file = _tiny_llama_gguf(tiny_base, tmp_path / "tiny.gguf")
    out = tmp_path / "imported"
    assert main(["base", "import-gguf", str(file), "--out", str(out)]) == 0
    assert capsys.readouterr().out.endswith(f"wrote base model to {out}\n")
    want, got = load_file(tiny_base / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert got[name].dtype == np.float32 and np.array_equal(got[name], value), name
    ours, theirs = AutoTokenizer.from_pretrained(tiny_base), AutoTokenizer.from_pretrained(out)
    text = "Review: the movie was great\nSentiment: positive ünïcode ✓<|endoftext|>"
    assert theirs(text).input_ids == ours(text).input_ids and theirs.eos_token_id == ours.eos_token_id
    identity = base_identity(out)
    assert (identity["architecture"], identity["model_type"]) == ("LlamaForCausalLM", "llama")
    assert identity["source"] == {"source": "gguf", "file": "tiny.gguf", "architecture": "llama",
                                  "sha256": hashlib.sha256(file.read_bytes()).hexdigest()}
    assert sorted(os.listdir(tmp_path)) == ["imported", "tiny.gguf"]  # no staging directory left


def test_an_unsupported_architecture_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "base"
    with pytest.raises(BaseModelError, match="'bloom' model; loraplex imports llama, mistral, qwen2, phi3"):
        import_gguf(_gguf(tmp_path / "bloom.gguf", "bloom"), out)
    assert not out.exists() and os.listdir(tmp_path) == ["bloom.gguf"]


def test_a_corrupt_or_missing_file_is_named(tmp_path, capsys):
    corrupt = tmp_path / "model.gguf"
    corrupt.write_bytes(b"GGUF" + os.urandom(200))
    with pytest.raises(BaseModelError, match="not a readable GGUF model file"):
        import_gguf(corrupt, tmp_path / "out")
    assert main(["base", "import-gguf", str(tmp_path / "absent.gguf"), "--out", str(tmp_path / "out")]) == 2
    assert "absent.gguf not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_packaged_model_is_found_or_the_pip_command_is_named(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BaseModelError, match=SMOLLM2_INSTALL.replace(".", r"\.")):
        packaged_smollm2()


def test_a_base_directory_without_a_tokenizer_is_refused(tiny_base, tmp_path):
    bare = shutil.copytree(tiny_base, tmp_path / "bare")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()
    with pytest.raises(BaseModelError, match="has no tokenizer .*save_pretrained"):
        base_identity(bare)
