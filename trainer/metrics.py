"""Task metrics: the names used across loraplex, which fit which kind of task, and how each is computed.

Two kinds of task, told apart by their completions:
- `classification` (a label task): completions come from a small closed set ("positive",
  "negative"). Metrics: accuracy, macro_f1, exact_match, perplexity.
- `generation`: free text. Metrics: rouge_l, bleu, exact_match, perplexity.

Every metric is a float in [0, 1] except perplexity (>= 1, lower is better).
- exact_match: the fraction of predictions equal to their reference, character for character (the
  trainer's prediction is the text before EOS, so a completion that does not stop is no match).
- accuracy: the fraction of predictions equal to their label, surrounding whitespace stripped.
- macro_f1: per-label F1 (torchmetrics) on the stripped labels, averaged over the labels that occur
  in the references or predictions; a prediction that is no label is a miss for its reference's label.
- rouge_l: ROUGE-L F-measure per pair (torchmetrics, the rouge-score algorithm: lowercased,
  alphanumeric tokens, no stemming), averaged over pairs.
- bleu: corpus BLEU (sacreBLEU, 13a tokenization, exp smoothing) / 100, with effective order: a
  corpus whose completions are shorter than 4 tokens is scored on the n-gram orders it has instead
  of scoring 0.
- perplexity: exp(mean cross-entropy per completion token), from the eval loss.

The trainer (training.json), export's accuracy check and the server's ModelInfo use these names.
Torch-free at import; torchmetrics and sacrebleu are imported by `compute_metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal, get_args

MetricName = Literal["exact_match", "accuracy", "macro_f1", "rouge_l", "bleu", "perplexity"]
TaskKind = Literal["classification", "generation"]

METRICS: tuple[str, ...] = get_args(MetricName)
TASK_KINDS: tuple[str, ...] = get_args(TaskKind)
LOWER_IS_BETTER = frozenset({"perplexity"})
TEXT_METRICS = tuple(m for m in METRICS if m != "perplexity")
# The metrics recorded for each kind, the first one being the default that selects checkpoints.
KIND_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "macro_f1", "exact_match", "perplexity"),
    "generation": ("rouge_l", "bleu", "exact_match", "perplexity"),
}
CLASSIFICATION_ONLY = frozenset({"accuracy", "macro_f1"})
# A task is inferred to be a label task when its completions take at most this many distinct
# values and each value occurs in two records or more on average.
MAX_INFERRED_LABELS = 20


class MetricError(ValueError):
    """A metric does not fit the task or its inputs; the message says which and what to use instead."""


def higher_is_better(name: str) -> bool:
    return name not in LOWER_IS_BETTER


def better(name: str, value: float, than: float | None) -> bool:
    """`value` is strictly better than `than` for metric `name` (None: nothing to beat yet)."""
    if than is None:
        return True
    return value < than if name in LOWER_IS_BETTER else value > than


def is_perfect(name: str, value: float) -> bool:
    """No evaluation can improve on `value`: 1.0 for the [0, 1] metrics (perplexity has no such bound in practice)."""
    return value <= 1.0 if name in LOWER_IS_BETTER else value >= 1.0


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def labels_of(completions: Iterable[str]) -> list[str]:
    """The distinct completions, stripped, sorted: a label task's label set."""
    return sorted({c.strip() for c in completions})


def infer_kind(completions: Sequence[str]) -> TaskKind:
    """`classification` when the completions form a small closed set, else `generation`."""
    labels = labels_of(completions)
    if 2 <= len(labels) <= MAX_INFERRED_LABELS and len(completions) >= 2 * len(labels):
        return "classification"
    return "generation"


def check_metric_fits(metric: str, completions: Sequence[str], *, where: str) -> TaskKind:
    """The task's kind given its declared metric ("auto" infers it); MetricError when they disagree.

    accuracy and macro_f1 need a label task: completions that repeat (each value in two records or
    more on average). The other metrics fit any task.
    """
    if metric not in (*METRICS, "auto"):
        raise MetricError(f"{where}: metric {metric!r} is unknown; choose one of auto, {', '.join(METRICS)}")
    inferred = infer_kind(completions)
    if metric not in CLASSIFICATION_ONLY:
        return inferred
    labels = labels_of(completions)
    if len(completions) < 2 * len(labels) or len(labels) < 2:
        reason = (
            f"all {len(completions)} records have the same completion {labels[0]!r}"
            if len(labels) == 1
            else f"its {len(completions)} records have {len(labels)} distinct completions"
        )
        raise MetricError(
            f"{where}: metric {metric!r} needs a label task (completions from a small closed set), but {reason}; "
            "use metric: rouge_l, bleu or exact_match for generated text, or metric: auto"
        )
    return "classification"


def primary_metric(metric: str, kind: TaskKind) -> str:
    """The metric that selects checkpoints and search trials: the declared one, or the kind's default."""
    return KIND_METRICS[kind][0] if metric == "auto" else metric


def metrics_for(metric: str, kind: TaskKind) -> list[str]:
    """Every metric recorded for a task: its primary metric first, then the rest of its kind's."""
    primary = primary_metric(metric, kind)
    return [primary] + [m for m in KIND_METRICS[kind] if m != primary]


def compute_metrics(
    names: str | Sequence[str],
    predictions: Sequence[str],
    references: Sequence[str],
    *,
    labels: Sequence[str] | None = None,
    eval_loss: float | None = None,
) -> dict[str, float]:
    """{name: value} for each metric in `names` (or a task kind: all of that kind's metrics).

    `labels`: a label task's label set (default: the distinct references). `eval_loss`: mean
    cross-entropy per completion token, needed for perplexity only.
    """
    if isinstance(names, str):
        names = KIND_METRICS.get(names, [names])
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise MetricError(f"unknown metric {unknown[0]!r}; known: {', '.join(METRICS)}")
    if len(predictions) != len(references):
        raise MetricError(f"{len(predictions)} predictions for {len(references)} references")
    if not references and any(n != "perplexity" for n in names):
        raise MetricError("no references to score: text metrics need at least one prediction")
    preds = [p.strip() for p in predictions]
    refs = [r.strip() for r in references]
    results: dict[str, float] = {}
    for name in names:
        if name == "perplexity":
            if eval_loss is None:
                raise MetricError("perplexity comes from the eval loss: pass eval_loss=")
            results[name] = perplexity(eval_loss)
        elif name == "exact_match":  # counts of equal strings: nothing to delegate
            results[name] = sum(p == r for p, r in zip(predictions, references, strict=True)) / len(refs)
        elif name == "accuracy":
            results[name] = sum(p == r for p, r in zip(preds, refs, strict=True)) / len(refs)
        elif name == "macro_f1":
            results[name] = _macro_f1(preds, refs, labels)
        elif name == "rouge_l":
            results[name] = _rouge_l(preds, refs)
        elif name == "bleu":
            results[name] = _bleu(preds, refs)
    return results


def _label_indices(preds: list[str], refs: list[str], labels: Sequence[str] | None):
    """Class indices for torchmetrics: known labels 0..K-1, anything else K (no label)."""
    import torch

    label_set = [label.strip() for label in labels] if labels is not None else labels_of(refs)
    index = {label: i for i, label in enumerate(label_set)}
    missing = sorted({r for r in refs if r not in index})
    if missing:
        raise MetricError(f"reference {missing[0]!r} is not one of the labels {label_set}")
    other = len(label_set)
    predicted = torch.tensor([index.get(p, other) for p in preds])
    target = torch.tensor([index[r] for r in refs])
    return predicted, target, len(label_set)


def _macro_f1(preds: list[str], refs: list[str], labels: Sequence[str] | None) -> float:
    from torchmetrics.functional.classification import multiclass_f1_score

    predicted, target, k = _label_indices(preds, refs, labels)
    per_label = multiclass_f1_score(predicted, target, num_classes=k + 1, average="none", zero_division=0)
    # Average over the labels that occur (as reference or prediction), as torchmetrics' own macro average
    # does; the "no label" class is not a label.
    occurs = [i for i in range(k) if bool((target == i).any() or (predicted == i).any())]
    return float(per_label[occurs].mean())


def _rouge_l(preds: list[str], refs: list[str]) -> float:
    from torchmetrics.functional.text import rouge_score

    return float(rouge_score(preds, refs, rouge_keys="rougeL")["rougeL_fmeasure"])  # the mean over pairs


def _bleu(preds: list[str], refs: list[str]) -> float:
    import sacrebleu

    return sacrebleu.BLEU(effective_order=True).corpus_score(preds, [refs]).score / 100.0
