"""`add_adapter` / `loraplex adapters add`: add or replace one adapter without rebuilding the graph."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from loraplex.adapters.export import add_adapter, convert
from loraplex.adapters.export.convert import IncompatibleAdapter
from loraplex.adapters.export.parity import ParityError
from loraplex.adapters.package.manifest import Manifest
from loraplex.runtime.app.cli import main

from tests.fixtures.packages import TINY_TEMPLATES


@pytest.fixture
def package(tiny_package, tmp_path):
    """A private copy of the tiny package (tests here change it)."""
    return shutil.copytree(tiny_package, tmp_path / "package")


def test_add_a_new_adapter(package, tiny_base, random_adapter_factory):
    before = Manifest.load(package)
    adapter_dir = random_adapter_factory(tiny_base, "delta", 8, ("q_proj", "k_proj", "o_proj"), 21)
    entry = add_adapter(package, "delta", adapter_dir)
    after = Manifest.load(package)
    assert after.adapters["delta"] == entry
    assert (entry.rank, entry.target_modules) == (8, ["k_proj", "o_proj", "q_proj"])
    assert entry.file == "adapters/delta.onnx_adapter"
    assert entry.parity.passed and entry.parity.tokens_equal and entry.parity.reference == "pytorch-peft"
    assert entry.size_bytes == (package / entry.file).stat().st_size
    assert 0.9 < entry.size_bytes / entry.peft_size_bytes < 1.05  # its own modules and rank: no padding
    assert {n: after.adapters[n] for n in before.adapters} == before.adapters  # others untouched
    assert not [p for p in (package / "adapters").iterdir() if p.name.startswith(".")]  # no temp files left


def test_replace_an_adapter_changes_file_and_version(package, tiny_base, random_adapter_factory):
    old = Manifest.load(package).adapters["alpha"]
    old_inode = (package / old.file).stat().st_ino
    retrained = random_adapter_factory(tiny_base, "alpha", 4, ("q_proj", "v_proj"), 99,
                                       template=TINY_TEMPLATES["alpha"])
    entry = add_adapter(package, "alpha", retrained, version="v2", verify=False)
    assert entry.version == "v2" and entry.sha256 != old.sha256 and entry.parity is None
    assert entry.template == TINY_TEMPLATES["alpha"]
    # replaced by rename, never rewritten in place: a server that mapped the old file keeps reading it
    assert (package / entry.file).stat().st_ino != old_inode
    assert Manifest.load(package).adapters["alpha"].version == "v2"


def test_adapter_trained_on_another_base_is_refused(package, tmp_path_factory, random_adapter_factory):
    """Same architecture and shapes, other weights (seed 1): the recorded sha256 catches it."""
    from loraplex.trainer.tiny_base import build_tiny_base

    other_base = build_tiny_base(tmp_path_factory.mktemp("other_base"), seed=1)
    other = random_adapter_factory(other_base, "other", 4, ("q_proj",), 3)
    with pytest.raises(IncompatibleAdapter, match="trained on a base model with weights sha256"):
        add_adapter(package, "other", other, verify=False)
    assert "other" not in Manifest.load(package).adapters
    assert not (package / "adapters" / "other.onnx_adapter").exists()


def test_module_missing_from_graph_is_refused(package_factory, tiny_base, random_adapter_factory, tmp_path):
    qv_only = shutil.copytree(package_factory((("qv", 4, ("q_proj", "v_proj"), 1),), verify=False), tmp_path / "qv")
    adapter_dir = random_adapter_factory(tiny_base, "needs_o", 4, ("q_proj", "o_proj", "down_proj"), 4)
    expected = "targets down_proj, o_proj but the package graph has LoRA inputs only for q_proj, v_proj"
    with pytest.raises(IncompatibleAdapter, match=expected):
        add_adapter(qv_only, "needs_o", adapter_dir, verify=False)


def test_a_rank_above_every_rank_in_the_package_adds_and_matches_pytorch(package, tiny_base,
                                                                         random_adapter_factory):
    adapter_dir = random_adapter_factory(tiny_base, "big", 32, ("q_proj",), 6)
    entry = add_adapter(package, "big", adapter_dir)  # the graph's rank is symbolic: no limit
    assert entry.rank == 32 > Manifest.load(package).lora_rank and entry.parity.tokens_equal


def test_diverging_adapter_fails_and_leaves_the_old_file(package, tiny_base, random_adapter_factory, monkeypatch):
    """A converter bug (B scaled wrongly) must be caught by parity, naming the adapter; the file
    the server may be serving stays as it was."""
    original = convert.adapter_tensors

    def wrong_scale(adapter, graph):
        tensors = original(adapter, graph)
        return {k: v * np.float32(1.5) if ".lora_B." in k else v for k, v in tensors.items()}

    monkeypatch.setattr(convert, "adapter_tensors", wrong_scale)
    old_bytes = (package / "adapters" / "beta.onnx_adapter").read_bytes()
    retrained = random_adapter_factory(tiny_base, "beta", 8, ("q_proj", "v_proj"), 42)
    with pytest.raises(ParityError, match="adapter 'beta'"):
        add_adapter(package, "beta", retrained)
    assert (package / "adapters" / "beta.onnx_adapter").read_bytes() == old_bytes
    assert Manifest.load(package).adapters["beta"].parity.passed
    assert not [p for p in (package / "adapters").iterdir() if p.name.startswith(".")]


def test_cli_adapters_add(package, tiny_base, random_adapter_factory, capsys, monkeypatch):
    adapter_dir = random_adapter_factory(tiny_base, "delta", 8, ("q_proj", "k_proj", "o_proj"), 21)
    monkeypatch.chdir(package.parent)  # relative package path, as typed at a shell
    assert main(["adapters", "add", package.name, f"delta={adapter_dir}", "--no-verify"]) == 0
    assert "delta" in capsys.readouterr().out and "delta" in Manifest.load(package).adapters
    assert main(["adapters", "add", str(package), "no-equals-sign"]) == 2
    assert "must be NAME=PATH" in capsys.readouterr().err
    assert main(["adapters", "add", str(package), f"../evil={adapter_dir}"]) == 2
    assert "adapter name '../evil' is invalid" in capsys.readouterr().err


def _with_output(adapter_dir, tmp_path, output):
    """A copy of a PEFT adapter dir whose training.json records `output`."""
    import json

    copy = shutil.copytree(adapter_dir, tmp_path / "with_output")
    training = json.loads((copy / "training.json").read_text())
    training["output"] = output
    (copy / "training.json").write_text(json.dumps(training))
    return copy


def test_the_output_contract_training_recorded_reaches_the_manifest(package, tiny_base, random_adapter_factory,
                                                                     tmp_path):
    adapter_dir = random_adapter_factory(tiny_base, "alpha", 4, ("q_proj", "v_proj"), 1,
                                         template=TINY_TEMPLATES["alpha"])
    output = {"kind": "choice", "spec": [" positive", " negative"]}
    entry = add_adapter(package, "labels", _with_output(adapter_dir, tmp_path, output), verify=False)
    assert entry.output == output
    assert Manifest.load(package).adapters["labels"].output_constraint().spec == (" positive", " negative")


def test_an_invalid_output_contract_fails_the_export_naming_the_adapter(package, tiny_base, random_adapter_factory,
                                                                         tmp_path):
    from loraplex.adapters.export.peft_adapter import AdapterError

    adapter_dir = random_adapter_factory(tiny_base, "alpha", 4, ("q_proj", "v_proj"), 1,
                                         template=TINY_TEMPLATES["alpha"])
    bad = _with_output(adapter_dir, tmp_path, {"kind": "regex", "spec": "[0-"})
    with pytest.raises(AdapterError, match=r"adapter 'digits'.*output contract.*regex"):
        add_adapter(package, "digits", bad, verify=False)
    assert "digits" not in Manifest.load(package).adapters
