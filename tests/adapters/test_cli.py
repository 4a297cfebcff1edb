"""`loraplex export` from the command line: --adapter NAME=DIR, --config tasks.yaml, errors."""

from __future__ import annotations

import shutil

from loraplex.adapters.package.manifest import Manifest
from loraplex.runtime.app.cli import main

from tests.fixtures.packages import TINY_SPEC

TASKS_YAML = """\
base: {base}
out: adapters
tasks:
  alpha:
    data: alpha.jsonl
    prompt_template: "Review: {{text}}\\nSentiment:"
    completion_template: " {{label}}"
  gamma:
    data: gamma.jsonl
    prompt_template: "Translate: {{word}}\\nFrench:"
    completion_template: " {{french}}"
"""


def _adapters(tiny_base, random_adapter_factory):
    return {name: random_adapter_factory(tiny_base, name, rank, targets, seed)
            for name, rank, targets, seed in TINY_SPEC}


def test_export_with_named_adapters(tiny_base, random_adapter_factory, tmp_path, capsys):
    ads = _adapters(tiny_base, random_adapter_factory)
    out = tmp_path / "pkg"
    rc = main(["export", "--base", str(tiny_base), "--adapter", f"alpha={ads['alpha']}",
               "--adapter", f"gamma={ads['gamma']}", "--out", str(out), "--no-verify"])
    assert rc == 0
    m = Manifest.load(out)
    assert sorted(m.adapters) == ["alpha", "gamma"] and m.lora_rank == 16
    assert all(e.parity is None for e in m.adapters.values())
    printed = capsys.readouterr().out
    assert "alpha" in printed and "gamma" in printed and "not checked" in printed and "stages:" in printed


def test_export_from_task_file(tiny_base, random_adapter_factory, tmp_path):
    """The trainer's task file: each task's adapter is read from OUT/TASK."""
    ads = _adapters(tiny_base, random_adapter_factory)
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(TASKS_YAML.format(base=tiny_base))
    shutil.copytree(ads["alpha"], tmp_path / "adapters" / "alpha")
    assert main(["export", "--config", str(tasks), "--out", str(tmp_path / "pkg"), "--no-verify"]) == 2  # no gamma
    shutil.copytree(ads["gamma"], tmp_path / "adapters" / "gamma")
    assert main(["export", "--config", str(tasks), "--out", str(tmp_path / "pkg"), "--no-verify"]) == 0
    m = Manifest.load(tmp_path / "pkg")
    assert {n: e.rank for n, e in m.adapters.items()} == {"alpha": 4, "gamma": 16}


def test_export_errors_name_the_fault(tiny_base, random_adapter_factory, tmp_path, capsys):
    ads = _adapters(tiny_base, random_adapter_factory)
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "notes.txt").write_text("mine")
    cases = [
        (["--adapter", f"alpha={ads['alpha']}", "--out", str(tmp_path / "occupied")], "is not a loraplex package"),
        (["--adapter", "alpha", "--out", str(tmp_path / "x")], "must be NAME=PATH"),
        (["--adapter", f"alpha={tmp_path}", "--out", str(tmp_path / "x")], "no adapter_config.json"),
        (["--out", str(tmp_path / "x")], "no adapters"),
        (["--adapter", f"alpha={ads['alpha']}", "--adapter", f"alpha={ads['beta']}", "--out", str(tmp_path / "x")],
         "given twice"),
    ]
    for extra, message in cases:
        assert main(["export", "--base", str(tiny_base), *extra]) == 2
        assert message in capsys.readouterr().err
    assert main(["export", "--adapter", f"alpha={ads['alpha']}", "--out", str(tmp_path / "x")]) == 2
    assert "no base model" in capsys.readouterr().err
    assert main(["export", "--base", str(tmp_path), "--adapter", f"alpha={ads['alpha']}",
                 "--out", str(tmp_path / "x")]) == 2
    assert "not a Hugging Face model directory" in capsys.readouterr().err


def test_a_task_files_output_contract_reaches_the_manifest_and_a_bad_one_fails_the_export(
        tiny_base, random_adapter_factory, tmp_path, capsys):
    """`output:` declared in the task file wins at export over what training recorded (none here)."""
    ads = _adapters(tiny_base, random_adapter_factory)
    for name in ("alpha", "gamma"):
        shutil.copytree(ads[name], tmp_path / "adapters" / name)
    contract = '\n    output: {{kind: choice, spec: [" yes", " no"]}}'
    declared = TASKS_YAML.replace('completion_template: " {{label}}"', 'completion_template: " {{label}}"' + contract)
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(declared.format(base=tiny_base))
    assert main(["export", "--config", str(tasks), "--out", str(tmp_path / "pkg"), "--no-verify"]) == 0
    m = Manifest.load(tmp_path / "pkg")
    assert m.adapters["alpha"].output == {"kind": "choice", "spec": [" yes", " no"]}
    assert m.adapters["gamma"].output is None
    tasks.write_text(declared.replace("kind: choice, spec: [\" yes\", \" no\"]", 'kind: regex, spec: "[0-"')
                     .format(base=tiny_base))
    assert main(["export", "--config", str(tasks), "--out", str(tmp_path / "bad"), "--no-verify"]) == 2
    assert "adapter 'alpha'" in capsys.readouterr().err
