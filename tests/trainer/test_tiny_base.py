import json

import pytest
from loraplex.trainer.tiny_base import ARCHITECTURES, build_tiny_base


def test_tiny_base_is_deterministic_for_a_seed(tiny_base, tmp_path):
    again = build_tiny_base(tmp_path / "again", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_base / name).read_bytes(), name
    other = build_tiny_base(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny_base / "model.safetensors").read_bytes()


def test_tiny_base_loads_as_causal_lm_and_tokenizer_round_trips(tiny_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    text = "Review: the movie was great\nSentiment: positive ünïcode ✓"
    assert tok.decode(tok(text).input_ids) == text
    # Demo words are single tokens (with their leading space): the tasks are learnable.
    assert len(tok(" reverse").input_ids) <= 2
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    assert model.config.architectures == ["LlamaForCausalLM"]
    assert json.loads((tiny_base / "config.json").read_text())["eos_token_id"] == tok.eos_token_id


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_architecture_builds(tiny_base_factory, architecture):
    path = tiny_base_factory(architecture)
    assert (path / "model.safetensors").is_file()


def test_the_tiny_base_command_writes_the_same_model(tiny_base, tmp_path, capsys):
    """`loraplex tiny-base`: its defaults (seed 0, llama) give the session's tiny base byte for byte."""
    from loraplex.runtime.app.cli import main

    assert main(["tiny-base", "--out", str(tmp_path / "base")]) == 0
    assert capsys.readouterr().out == f"wrote tiny llama base model to {tmp_path / 'base'}\n"
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "base" / name).read_bytes() == (tiny_base / name).read_bytes(), name
    assert main(["tiny-base", "--out", str(tmp_path / "other"), "--seed", "1", "--arch", "mistral"]) == 0
    assert json.loads((tmp_path / "other" / "config.json").read_text())["architectures"] == ["MistralForCausalLM"]
    want = build_tiny_base(tmp_path / "want", seed=1, architecture="mistral")  # both flags reached the builder
    assert (tmp_path / "other" / "model.safetensors").read_bytes() == (want / "model.safetensors").read_bytes()
