"""Hyper-parameter search on the tiny base: trials, the best kept by the eval metric, the table, the time limit."""

import json

import pytest
from loraplex.trainer.base_model import base_identity
from loraplex.trainer.config import TaskConfig
from loraplex.trainer.search import _best, _objective, search_task

from tests.trainer.conftest import SENTIMENT


def test_a_search_of_three_trials_keeps_the_best_by_the_metric(loaded_base, tiny_base, small_data, tmp_path,
                                                                capsys):  # fmt: skip
    from loraplex.trainer.summary import print_summary

    model, tokenizer = loaded_base
    # A short budget in which the learning rate decides how far a trial gets.
    config = TaskConfig(task="mood", data=small_data, **SENTIMENT, out=tmp_path, max_steps=12, eval_steps=3,
                        batch_size=8, eval_split=0.25, learning_rate=3e-4, report_to="tensorboard",
                        search={"learning_rate": [1e-4, 2e-2], "rank": [2, 4]})  # fmt: skip
    result = search_task(model, tokenizer, config, base_identity(tiny_base), trials=3, progress=False)
    search = result.training["search"]
    trials = search["trials"]
    assert [t["trial"] for t in trials] == [0, 1, 2] and search["trials_run"] == 3
    assert trials[0]["params"]["learning_rate"] == 3e-4  # trial 0: the task's own settings (rank 8 is no choice)
    assert all(1e-4 <= t["params"]["learning_rate"] <= 2e-2 for t in trials)
    best = trials[search["best_trial"]]
    assert best["metric"] == max(t["metric"] for t in trials)
    assert best["eval_loss"] == min(t["eval_loss"] for t in trials if t["metric"] == best["metric"])
    assert len({t["metric"] for t in trials}) > 1  # the trials differ: the choice is not a coin toss

    # The kept adapter is the best trial's: its options, its weights, its figures.
    saved = json.loads((tmp_path / "mood" / "training.json").read_text())
    assert saved == json.loads(json.dumps(result.training))
    assert saved["config"]["learning_rate"] == best["params"]["learning_rate"]
    assert saved["eval_metrics"]["accuracy"] == best["metric"] and saved["metric"] == "accuracy"
    adapter = json.loads((tmp_path / "mood" / "adapter_config.json").read_text())
    assert adapter["r"] == best["params"].get("rank", 8)
    assert (tmp_path / "mood" / "adapter_model.safetensors").is_file()
    assert saved["files"]["tensorboard"] == f"search/trial-{best['trial']:02d}/tensorboard"
    for t in trials:  # each trial's record stays; only the kept weights remain
        trial_dir = tmp_path / "mood" / "search" / f"trial-{t['trial']:02d}"
        assert {"training.json", "curves.png", "tensorboard"} <= {p.name for p in trial_dir.iterdir()}
        assert not (trial_dir / "adapter_model.safetensors").exists()

    print_summary([result])
    out = capsys.readouterr().out
    assert "search: mood (3 of 3 trials" in out and f"*{search['best_trial']}" in out


class StepClock:
    """A clock that moves one second each time it is read: the search reads it once to set its deadline,
    each trial before each step and the search after each trial, so a trial's steps "take" 1 s each."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_the_time_limit_ends_the_search_and_its_running_trial(loaded_base, tiny_base, small_data, tmp_path):
    model, tokenizer = loaded_base
    # No early stopping and a budget of 100k steps: only the time limit (5 s on the clock) ends the first trial.
    config = TaskConfig(task="mood", data=small_data, **SENTIMENT, out=tmp_path, max_steps=100_000, eval_steps=10,
                        early_stopping_patience=None)  # fmt: skip
    result = search_task(model, tokenizer, config, base_identity(tiny_base), trials=5, timeout=5, progress=False,
                         clock=StepClock())  # fmt: skip
    search = result.training["search"]
    assert search["timed_out"] and search["trials_run"] == 1
    # On this clock: deadline 1 + 5 = 6; steps start at 2, 3, 4, 5; the read at 6 ends the trial.
    assert search["trials"][0]["stop_reason"] == "timeout" and search["trials"][0]["steps"] == 4
    assert result.training["plateaued"] is not None


def test_equal_metrics_prefer_the_lower_eval_loss():
    rows = [{"metric": 0.9, "eval_loss": 0.5}, {"metric": 1.0, "eval_loss": 0.4}, {"metric": 1.0, "eval_loss": 0.2}]
    assert _best(rows, "accuracy") == 2
    assert _best([{"metric": 3.0, "eval_loss": 1.1}, {"metric": 2.0, "eval_loss": 0.7}], "perplexity") == 1
    # What Optuna models orders the same way, and never reorders different metric values.
    values = [_objective("accuracy", r["metric"], r["eval_loss"]) for r in rows]
    assert values[2] > values[1] > values[0]
    assert _objective("accuracy", 0.975, 0.0) < _objective("accuracy", 1.0, 100.0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"eval_split": 0.0}, "task 'mood': --search compares trials on the eval split; set eval_split > 0"),
        ({"resume": True}, "--resume continues one run and cannot resume a search"),
        ({"search": {"target_modules": [["q_proj"], ["qkv_proj"]]}}, "target module 'qkv_proj' does not exist"),
    ],
)
def test_a_search_that_cannot_compare_trials_fails_before_training(loaded_base, tiny_base, small_data, tmp_path,
                                                                   change, message):  # fmt: skip
    model, tokenizer = loaded_base
    config = TaskConfig(task="mood", data=small_data, **SENTIMENT, out=tmp_path, **change)
    with pytest.raises(ValueError, match=message):
        search_task(model, tokenizer, config, base_identity(tiny_base), trials=2, progress=False)
    assert not (tmp_path / "mood" / "search").exists()
