"""Hyper-parameter search: `loraplex train --search N` trains N trials of a task and keeps the best.

Optuna's TPE sampler (seeded with the task's seed; its first trials are random, then it models
which values do well) proposes learning rate, rank, alpha, target modules, step budget, batch size
and dropout within the task's SearchSpace. Trial 0 takes the task's own values of the searched
options where the space holds them (the rest sampled), so a search whose space holds the task's
settings never keeps something worse than training without one. Each trial is an ordinary
training run with early stopping, on the one base model already loaded, one after another.

The best trial has the best eval metric on the whole eval split (ties: the lower eval loss). Its
adapter, training.json and curves.png are written to OUT/TASK; training.json's `search` holds the
table of trials. Each trial's own training.json and curves.png (and TensorBoard events) stay in
OUT/TASK/search/trial-NN; their adapter weights are deleted once the best is copied.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

from loraplex.trainer.config import ConfigError, TaskConfig
from loraplex.trainer.metrics import better, higher_is_better
from loraplex.trainer.search_space import ALL_MODULES, DEFAULT_SPACE, SearchSpace
from loraplex.trainer.summary import format_param

SEARCH_DIR = "search"
TIE_BREAK = 1e-6
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md", "curves.png")


def check_search(config: TaskConfig, trials: int, timeout: float | None) -> None:
    """Refuse a search that cannot compare trials, before the base is loaded."""
    where = f"task {config.task!r}"
    if trials < 1:
        raise ConfigError(f"--search {trials}: the number of trials must be at least 1")
    if timeout is not None and timeout <= 0:
        raise ConfigError(f"--search-timeout {timeout}: give a positive number of seconds")
    if config.eval_split == 0:
        raise ConfigError(f"{where}: --search compares trials on the eval split; set eval_split > 0")
    if config.resume:
        raise ConfigError(f"{where}: --resume continues one run and cannot resume a search; drop one of them")


def space_of(config: TaskConfig) -> SearchSpace:
    return config.search or SearchSpace.from_dict(DEFAULT_SPACE)


def suggest(trial: Any, space: SearchSpace) -> dict[str, Any]:
    """Optuna's proposal for one trial: {option: value} in Optuna's terms (target modules as a string)."""
    params: dict[str, Any] = {}
    if space.learning_rate:
        params["learning_rate"] = trial.suggest_float("learning_rate", *space.learning_rate, log=True)
    if space.rank:
        params["rank"] = trial.suggest_categorical("rank", space.rank)
    if space.alpha:
        params["alpha"] = trial.suggest_categorical("alpha", space.alpha)
    if space.target_modules:
        params["target_modules"] = trial.suggest_categorical("target_modules", _module_choices(space))
    if space.max_steps:
        params["max_steps"] = trial.suggest_int("max_steps", *space.max_steps, log=True)
    if space.batch_size:
        params["batch_size"] = trial.suggest_categorical("batch_size", space.batch_size)
    if space.dropout:
        params["dropout"] = trial.suggest_float("dropout", *space.dropout)
    return params


def _module_choices(space: SearchSpace) -> list[str]:
    return [c if c == ALL_MODULES else ",".join(c) for c in space.target_modules or []]


def _as_options(params: dict[str, Any]) -> dict[str, Any]:
    """Optuna's values as TaskConfig options."""
    options = dict(params)
    if "target_modules" in options:
        modules = options["target_modules"]
        options["target_modules"] = None if modules == ALL_MODULES else modules.split(",")
    return options


def task_settings(config: TaskConfig, space: SearchSpace) -> dict[str, Any]:
    """The task's own values of the searched options that lie in the space: trial 0's parameters."""
    fixed: dict[str, Any] = {}
    for name in space.params():
        allowed = getattr(space, name)
        value = getattr(config, name)
        if name == "target_modules":
            value = ALL_MODULES if value is None else ",".join(value)
            allowed = _module_choices(space)
        if name in SearchSpace.RANGES:
            if value is not None and allowed[0] <= value <= allowed[1]:
                fixed[name] = value
        elif value in allowed:
            fixed[name] = value
    return fixed


def search_task(
    model: Any, tokenizer: Any, config: TaskConfig, identity: dict[str, str], *, trials: int,
    timeout: float | None = None, progress: bool = True, clock: Callable[[], float] = time.monotonic,
) -> Any:
    """Run the search for one task; returns the best trial's TrainingResult, written to OUT/TASK.

    `timeout` is measured on `clock` (seconds), for the search and its running trial alike.
    """
    import optuna
    from loraplex.trainer.base_model import resolve_target_modules
    from loraplex.trainer.record import write_training_json
    from loraplex.trainer.train import TrainingResult, prepare_task, train_task

    check_search(config, trials, timeout)
    started = time.perf_counter()
    deadline = clock() + timeout if timeout else None
    space = space_of(config)
    for choice in _module_choices(space):  # a module the model lacks fails now, not at trial 5
        resolve_target_modules(_as_options({"target_modules": choice})["target_modules"], identity["model_type"], model)
    data = prepare_task(config, model, tokenizer)
    metric = data.evaluator.primary
    trial_root = config.adapter_dir / SEARCH_DIR
    shutil.rmtree(trial_root, ignore_errors=True)  # trials of an earlier search would mix into the table

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    startup = max(1, min(10, trials // 2))
    sampler = optuna.samplers.TPESampler(seed=config.seed, n_startup_trials=startup)
    study = optuna.create_study(direction="maximize" if higher_is_better(metric) else "minimize", sampler=sampler)
    study.enqueue_trial(task_settings(config, space))
    rows: list[dict[str, Any]] = []
    results: list[Any] = []

    def objective(trial: Any) -> float:
        params = suggest(trial, space)
        trial_config = dataclasses.replace(config, **_as_options(params), search=None, checkpoint_every=None)
        out = trial_root / f"trial-{trial.number:02d}"
        result = train_task(model, tokenizer, trial_config, identity, progress=progress, data=data, out_dir=out,
                            deadline=deadline, clock=clock)  # fmt: skip
        t = result.training
        row = {"trial": trial.number, "params": params, "metric": t["eval_metrics"][metric],
               "eval_loss": t["final_eval_loss"], "steps": t["steps"], "stop_reason": t["stop_reason"],
               "plateaued": t["plateaued"], "time_s": t["wall_time_s"]}  # fmt: skip
        rows.append(row)
        results.append(result)
        if progress:
            shown = " ".join(f"{name}={format_param(name, value)}" for name, value in params.items())
            print(f"{config.task} trial {trial.number}: {metric} {row['metric']:.4g} after {row['steps']} steps "
                  f"({row['time_s']:.1f}s) with {shown}", file=sys.stderr, flush=True)  # fmt: skip
        return _objective(metric, row["metric"], row["eval_loss"])

    def stop_at_deadline(study: Any, _trial: Any) -> None:  # one clock for the search and its running trial
        if deadline is not None and clock() >= deadline:
            study.stop()

    study.optimize(objective, n_trials=trials, callbacks=[stop_at_deadline])
    best = _best(rows, metric)
    chosen = results[best]
    for name in ADAPTER_FILES:
        if (chosen.adapter_dir / name).is_file():
            config.adapter_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy2(chosen.adapter_dir / name, config.adapter_dir / name)
    for result in results:
        (result.adapter_dir / "adapter_model.safetensors").unlink(missing_ok=True)
    elapsed = time.perf_counter() - started
    training = dict(chosen.training)
    training["search"] = {
        "trials_requested": trials,
        "trials_run": len(rows),
        "timeout_s": timeout,
        "timed_out": timeout is not None and (len(rows) < trials or any(r["stop_reason"] == "timeout" for r in rows)),
        "sampler": f"TPE, seed {config.seed}, first {startup} random; trial 0 = the task's values",
        "space": space.to_dict(),
        "metric": metric,
        "direction": "maximize" if higher_is_better(metric) else "minimize",
        "best_trial": rows[best]["trial"],
        "wall_time_s": round(elapsed, 3),
        "trials": rows,
    }
    trial_dir = chosen.adapter_dir.relative_to(config.adapter_dir).as_posix()
    tensorboard = training["files"]["tensorboard"]
    training["files"] = {**training["files"], "search": SEARCH_DIR,
                         "tensorboard": f"{trial_dir}/{tensorboard}" if tensorboard else None}  # fmt: skip
    write_training_json(config.adapter_dir, training)
    return TrainingResult(config.task, config.adapter_dir, training)


def _objective(metric: str, value: float, eval_loss: float | None) -> float:
    """The value Optuna models: the metric, with the eval loss breaking ties.

    On small eval splits many trials reach the same accuracy (often 1.0); TPE splits trials into
    good and bad by rank, and ties leave it no signal. A 1e-6 weight orders equal metrics by eval loss
    without reordering different ones (metric steps are >= 1/eval records).
    """
    if metric == "perplexity" or eval_loss is None or not math.isfinite(eval_loss):
        return value
    return value - TIE_BREAK * min(eval_loss, 100.0)


def _best(rows: list[dict[str, Any]], metric: str) -> int:
    """Index of the best row: the best metric, then the lowest eval loss, then the earliest trial."""
    best = 0
    for i, row in enumerate(rows[1:], start=1):
        top = rows[best]
        if better(metric, row["metric"], top["metric"]) or (
            row["metric"] == top["metric"] and row["eval_loss"] < top["eval_loss"]
        ):
            best = i
    return best
