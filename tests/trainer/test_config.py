import json
from pathlib import Path

import pytest
from loraplex.trainer.cli import add_config_options, overrides_from_args
from loraplex.trainer.config import ConfigError, TaskConfig, config_fields, load_tasks_yaml
from loraplex.trainer.demo_tasks import DATA_DIR

TASK = dict(task="t", data="d.jsonl", prompt_template="Q: {q}\nA:", completion_template=" {a}")


def write_yaml(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_yaml_defaults_overrides_and_relative_paths(tmp_path):
    file = write_yaml(
        tmp_path / "cfg" / "tasks.yaml",
        """
base: ../models/base
out: runs
defaults: {rank: 4, learning_rate: 0.01, epochs: 2}
tasks:
  first: {data: data/a.jsonl, prompt_template: "Q: {q}\\nA:", completion_template: " {a}"}
  second: {data: /abs/b.jsonl, prompt_template: "{x} ->", completion_template: " {y}", rank: 16, out: other}
""",
    )
    base, (first, second) = load_tasks_yaml(file)
    folder = file.parent.resolve()
    assert base == (folder / "../models/base").resolve()
    assert (first.task, first.rank, first.learning_rate, first.epochs) == ("first", 4, 0.01, 2)
    assert first.data == folder / "data/a.jsonl"
    assert first.adapter_dir == folder / "runs" / "first"
    assert first.prompt_template == "Q: {q}\nA:"
    assert (second.rank, second.data, second.out) == (16, Path("/abs/b.jsonl"), folder / "other")
    assert first.eval_split == 0.1  # the documented default
    assert (first.max_steps, first.epochs, first.early_stopping_patience, first.metric) == (None, 2, 3, "auto")
    # The caller's base and out win over the file's.
    base, configs = load_tasks_yaml(file, base=tmp_path / "b", out=tmp_path / "o")
    assert base == tmp_path / "b"
    assert [c.adapter_dir for c in configs] == [tmp_path / "o" / "first", tmp_path / "o" / "second"]


def test_demo_yaml_loads_three_tasks_with_existing_data():
    base, configs = load_tasks_yaml(DATA_DIR / "tasks.yaml")
    assert base is None
    assert [c.task for c in configs] == ["sentiment", "reverse", "translate"]
    assert all(c.data.is_file() for c in configs)


def test_unknown_option_names_it_and_lists_valid_ones(tmp_path):
    task = "{data: x, prompt_template: '{q}', completion_template: '{a}', rnak: 4}"
    file = write_yaml(tmp_path / "t.yaml", f"tasks:\n  a: {task}\n")
    with pytest.raises(ConfigError, match=r"task 'a'.*unknown option 'rnak'.*valid options are: .*rank"):
        load_tasks_yaml(file)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": "dora"}, "method 'dora' is unknown; choose one of lora, qlora"),
        ({"rank": 0}, "rank must be a positive integer"),
        ({"eval_split": 1.0}, r"eval_split must be in \[0, 1\)"),
        ({"completion_template": ""}, "completion_template is empty"),
        ({"prompt_template": "Q: {}"}, "fields must be named"),
        ({"metric": "bleu4"}, "task 't': metric 'bleu4' is unknown; choose one of auto, exact_match, accuracy"),
        ({"report_to": "wandb"}, "report_to 'wandb' is unknown; choose one of none, tensorboard"),
        ({"epochs": 0}, r"epochs must be > 0"),
        ({"logging_steps": 0}, "logging_steps must be a positive integer"),
        ({"eval_metric_limit": 0}, "eval_metric_limit must be a positive integer or null"),
    ],
)
def test_invalid_options_are_rejected_with_the_field(change, message):
    with pytest.raises(ConfigError, match=message):
        TaskConfig(**{**TASK, **change})


def test_config_round_trips_through_json():
    config = TaskConfig(**TASK, target_modules=["q_proj", "v_proj"], use_rslora=True, max_steps=7)
    again = TaskConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config


def test_every_field_has_help_and_a_cli_option():
    import argparse
    import dataclasses

    parser = argparse.ArgumentParser()
    add_config_options(parser)
    for f in dataclasses.fields(TaskConfig):
        assert f.metadata["help"], f.name
    file_only = [f.name for f in dataclasses.fields(TaskConfig) if f not in config_fields()]
    assert file_only == ["search", "output"]
    args = parser.parse_args(
        ["--task", "t", "--rank", "4", "--target-modules", "q_proj", "v_proj", "--use-rslora", "--learning-rate", "0.1",
         "--metric", "macro_f1", "--logging-steps", "5", "--eval-steps", "10", "--report-to", "tensorboard"]
    )  # fmt: skip
    assert overrides_from_args(args) == {
        "task": "t", "rank": 4, "target_modules": ["q_proj", "v_proj"], "use_rslora": True, "learning_rate": 0.1,
        "metric": "macro_f1", "logging_steps": 5, "eval_steps": 10, "report_to": "tensorboard",
    }  # fmt: skip
    with pytest.raises(SystemExit):  # a closed set: argparse lists the choices
        parser.parse_args(["--metric", "bleu4"])


def test_metric_choices_are_the_projects_metric_names():
    from loraplex.trainer.config import METRIC_CHOICES
    from loraplex.trainer.metrics import METRICS

    assert METRIC_CHOICES[0] == "auto"
    assert METRIC_CHOICES[1:] == METRICS


SEARCH_TASK = "{data: x, prompt_template: '{q}', completion_template: '{a}'}"


def test_search_space_from_defaults_and_task_merges_key_by_key(tmp_path):
    file = write_yaml(tmp_path / "t.yaml", f"""
defaults:
  search: {{learning_rate: [0.001, 0.01], rank: [4, 8]}}
tasks:
  a: {SEARCH_TASK}
  b: {{data: x, prompt_template: '{{q}}', completion_template: '{{a}}', search: {{rank: [16], batch_size: [8, 16]}}}}
""")
    _, (a, b) = load_tasks_yaml(file)
    assert a.search.to_dict() == {"learning_rate": [0.001, 0.01], "rank": [4, 8]}
    assert b.search.to_dict() == {"learning_rate": [0.001, 0.01], "rank": [16], "batch_size": [8, 16]}
    assert TaskConfig.from_dict(json.loads(json.dumps(b.to_dict()))) == b  # round-trips through training.json


@pytest.mark.parametrize(
    ("search", "message"),
    [
        ("{learning_rate: [0.01, 0.001]}", r"search learning_rate range \[0.01, 0.001\] is empty: low must be below"),
        ("{max_steps: [200, 200]}", r"search max_steps range \[200, 200\] is empty"),
        ("{rank: []}", r"search rank is \[\]: it needs a non-empty list of choices"),
        ("{lr: [0.001, 0.01]}", "search option 'lr' is unknown; searchable options: learning_rate, rank"),
        ("{learning_rate: [0, 0.01]}", "a log-scale range needs low > 0"),
        ("{batch_size: [8, 0]}", "search batch_size choice 0 is invalid: batch_size choices are positive whole"),
        ("{target_modules: [[]]}", r"search target_modules choice \[\] is neither a non-empty list"),
        ("{rank: null}", "the search space searches nothing"),
    ],
)
def test_invalid_search_space_names_the_task_and_the_fix(tmp_path, search, message):
    file = write_yaml(tmp_path / "t.yaml", f"tasks:\n  mood: {SEARCH_TASK[:-1]}, search: {search}}}\n")
    with pytest.raises(ConfigError, match=r"task 'mood'.*" + message + r".*under 'search:' in the task file"):
        load_tasks_yaml(file)


def test_empty_completion_template_names_the_task_and_the_fix(tmp_path):
    task = "{data: x, prompt_template: '{q}', completion_template: ''}"
    file = write_yaml(tmp_path / "t.yaml", f"tasks:\n  mood: {task}\n")
    with pytest.raises(ConfigError, match="task 'mood'.*completion_template is empty; say what the model must learn"):
        load_tasks_yaml(file)
