"""Importing base models from GGUF: what is refused, and that nothing half-written is left behind
(the real model's import is tested in tests/e2e/test_real_model.py)."""

from __future__ import annotations

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
