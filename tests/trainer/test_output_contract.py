"""A task's output contract (what the adapter may generate): declared under `output:` in the task
file, or inferred as a choice of the labels for a label task; recorded in training.json for export
(no training needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from loraplex.trainer.config import ConfigError, TaskConfig, load_tasks_yaml
from loraplex.trainer.metrics import infer_kind
from loraplex.trainer.output_contract import output_contract

TASK = dict(task="t", data="d.jsonl", prompt_template="Q: {q}\nA:", completion_template=" {a}")
LABELS = [" positive", " negative", " positive", " negative", " positive"]


def test_a_label_task_gets_a_choice_of_its_completions_as_rendered():
    kind = infer_kind(LABELS)
    assert kind == "classification"
    assert output_contract(TaskConfig(**TASK), LABELS, kind) == {"kind": "choice", "spec": [" negative", " positive"]}


def test_free_text_gets_none_and_none_opts_out():
    texts = [f" text {i}" for i in range(10)]
    assert output_contract(TaskConfig(**TASK), texts, infer_kind(texts)) is None
    assert output_contract(TaskConfig(**TASK, output="none"), LABELS, "classification") is None


def test_a_declared_contract_wins(tmp_path: Path):
    file = tmp_path / "tasks.yaml"
    file.write_text("""
tasks:
  digits:
    data: d.jsonl
    prompt_template: "Q: {q}\\nA:"
    completion_template: " {a}"
    output: {kind: regex, spec: " [0-9]+"}
  fields:
    data: d.jsonl
    prompt_template: "Q: {q}\\nA:"
    completion_template: " {a}"
    output: {kind: json_schema, spec: {type: object, properties: {n: {type: integer}}}}
""")
    _, (digits, fields) = load_tasks_yaml(file)
    assert output_contract(digits, LABELS, "classification") == {"kind": "regex", "spec": " [0-9]+"}
    declared = output_contract(fields, ["{}"], "generation")
    assert declared["kind"] == "json_schema" and '"integer"' in declared["spec"]


@pytest.mark.parametrize("output", [{"kind": "xml", "spec": "x"}, {"kind": "choice", "spec": []}, {"spec": "x"},
                                    {"kind": "json_schema", "spec": "[1]"}, "free"])
def test_a_malformed_contract_is_a_config_error_naming_the_task(output):
    with pytest.raises(ConfigError, match=r"task 't'.*output"):
        TaskConfig(**TASK, output=output)
