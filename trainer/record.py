"""The end of a task's training: score the kept adapter and the base, write the adapter, training.json and
curves.png, and drop the finished run's checkpoints.

training.json (also copied into the package manifest by export):
- identity: task, template, base (path, architecture, model_type, sha256), config (every option),
  lora (rank, alpha, target modules, trainable parameters), data (records, train/eval split).
- metrics: `task_kind` (classification | generation), `metric` (the primary metric, which selected
  the checkpoint), `metrics` (every name recorded), `eval_metrics` and `base_eval_metrics` ({name:
  value} on the whole eval split with and without the adapter), `eval_metric_curve` ([step, value]
  per evaluation), `metric_sample` (records the curve was scored on, of the eval split).
- output: the task's output contract ({kind, spec}: declared in the task file, or a choice of the
  labels for a label task; null: free text), which export writes into the manifest.
- schedule: steps, total_steps (the budget), eval_steps, best_step, stop_reason (budget |
  early_stopping | timeout), stopped_early, plateaued (true | false | null) and plateau_note.
- curves: train_loss ([step, mean over the logging interval]), eval_loss ([step, loss]).
- kept for readers of earlier files: final_eval_loss, eval_perplexity, eval_exact_match,
  base_eval_exact_match.
- eval_samples (the first five predictions, then up to five misses), times, library versions.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from loraplex.trainer.config import CHECKPOINT_DIR, TRAINING_JSON, TaskConfig


def base_scores(model: Any, tokenizer: Any, data: Any) -> Any:
    """The base model's figures on the eval split (LoRA disabled), computed once per task."""
    if data.base_scores is None and data.eval_set:
        with model.disable_adapter():
            data.base_scores = data.evaluator.final(model, tokenizer)
    return data.base_scores


def _rounded(metrics: dict[str, float] | None) -> dict[str, float] | None:
    return None if metrics is None else {k: round(v, 6) for k, v in metrics.items()}


def finish_task(
    model: Any,
    tokenizer: Any,
    config: TaskConfig,
    identity: dict[str, str],
    state: Any,
    data: Any,
    targets: list[str],
    out: Path,
    log: Any,
    *,
    eval_every: int,
    started: float,
) -> dict[str, Any]:
    import peft
    import torch
    import transformers
    from loraplex.trainer.plot import CURVES_PNG, plot_curves

    trained = time.perf_counter()
    evaluator = data.evaluator
    scores = evaluator.final(model, tokenizer) if data.eval_set else None
    base = base_scores(model, tokenizer, data)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    plateaued, plateau_note = state.plateau()
    predictions = scores.predictions if scores else []
    metrics = _rounded(scores.metrics if scores else None)
    base_metrics = _rounded(base.metrics if base else None)
    training = {
        "task": config.task,
        "template": config.template.to_dict(),
        "base": identity,
        "config": config.to_dict(),
        "lora": {"rank": config.rank, "alpha": config.alpha, "use_rslora": config.use_rslora,
                 "target_modules": targets,
                 "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)},
        "data": {"path": str(config.data), "records": len(data.train_set) + len(data.eval_set),
                 "train_records": len(data.train_set), "eval_records": len(data.eval_set)},
        "task_kind": evaluator.kind,
        "output": data.output,  # the output contract the server enforces by default (None: free text)
        "metric": evaluator.primary,
        "metrics": evaluator.metrics,
        "eval_metrics": metrics,
        "base_eval_metrics": base_metrics,
        "eval_metric_curve": state.eval_metric,
        "metric_sample": {"records": len(evaluator.sample), "of": len(data.eval_set)},
        "steps": state.step,
        "total_steps": state.total_steps,
        "eval_steps": eval_every,
        "stop_reason": state.stop_reason,
        "stopped_early": state.stop_reason == "early_stopping",
        "plateaued": plateaued,
        "plateau_note": plateau_note,
        "best_step": state.best_step if config.restore_best and state.best_state is not None else state.step,
        "train_loss": state.train_loss,
        "eval_loss": state.eval_loss,
        "final_eval_loss": scores.loss if scores else None,
        "base_eval_loss": base.loss if base else None,
        "eval_perplexity": metrics["perplexity"] if metrics else None,
        "eval_exact_match": metrics["exact_match"] if metrics else None,
        "base_eval_exact_match": base_metrics["exact_match"] if base_metrics else None,
        "eval_samples": [
            {"prompt": p.prompt, "expected": p.expected, "generated": p.generated, "correct": p.correct}
            for p in predictions[:5] + [p for p in predictions[5:] if not p.correct][:5]
        ],  # the first five, then up to five misses
        "files": {"curves": CURVES_PNG, "tensorboard": str(log.directory.relative_to(out)) if log.directory else None},
        "train_time_s": round(trained - started, 3),
        "wall_time_s": None,  # set below, once everything is written
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }  # fmt: skip
    if metrics:
        log.final(state.step, metrics, base_metrics or {})
    plot_curves(training, out / CURVES_PNG)
    training["wall_time_s"] = round(time.perf_counter() - started, 3)
    write_training_json(out, training)
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    return training


def write_training_json(out: Path, training: dict[str, Any]) -> None:
    (out / TRAINING_JSON).write_text(json.dumps(training, indent=2) + "\n")
