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
        ({"eval_split": 0.0, "early_stopping_patience": 2}, "early_stopping_patience needs an eval split"),
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

    parser = argparse.ArgumentParser()
    add_config_options(parser)
    for f in config_fields():
        assert f.metadata["help"], f.name
    args = parser.parse_args(
        ["--task", "t", "--rank", "4", "--target-modules", "q_proj", "v_proj", "--use-rslora", "--learning-rate", "0.1"]
    )
    assert overrides_from_args(args) == {
        "task": "t", "rank": 4, "target_modules": ["q_proj", "v_proj"], "use_rslora": True, "learning_rate": 0.1,
    }  # fmt: skip
