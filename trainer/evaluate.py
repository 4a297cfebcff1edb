"""Quality figures on the eval split: token-level loss (perplexity) and the task's metrics on greedy output.

Greedy decoding from the prompt alone, as a client of the server sees it, with a short budget: the
reference completion's length + 1 tokens (one more cannot change whether it matched). Prompts are
batched only with prompts of the same token length, so no padding enters generation and each
result equals an unbatched run.

During training the eval loss covers the whole eval split and the metric a fixed sample of at
most `eval_metric_limit` records (generation is the slow part); the final figures cover it all.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from loraplex.trainer.dataset import IGNORE_INDEX, Example, collate
from loraplex.trainer.metrics import compute_metrics, labels_of, metrics_for, perplexity


@dataclass(frozen=True)
class Prediction:
    index: int
    prompt: str
    expected: str
    generated: str
    stopped: bool  # EOS was produced

    @property
    def correct(self) -> bool:
        """Strict: the expected text, then EOS (what `eval_samples` in training.json flags)."""
        return self.stopped and self.generated == self.expected


def eval_loss(model: Any, examples: list[Example], pad_id: int, batch_size: int = 64) -> float:
    """Mean cross-entropy per completion token (EOS included) over `examples`."""
    import torch

    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], pad_id)
            batch = {k: v.to(model.device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            total += torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            ).item()
            count += int((labels != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / max(count, 1)


def greedy_predictions(model: Any, tokenizer: Any, examples: list[Example], batch_size: int = 64) -> list[Prediction]:
    """Greedy completions of each example's prompt, at most its completion length + 1 tokens."""
    import torch

    groups: dict[int, list[Example]] = defaultdict(list)
    for e in examples:
        groups[e.prompt_length].append(e)
    eos = tokenizer.eos_token_id
    results: dict[int, Prediction] = {}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for length, group in sorted(groups.items()):
            for start in range(0, len(group), batch_size):
                chunk = group[start : start + batch_size]
                ids = torch.tensor([e.input_ids[:length] for e in chunk], device=model.device)
                # Completion tokens incl. EOS: generating one more than the longest cannot change a match.
                budget = max(len(e.input_ids) - length for e in chunk) + 1
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=budget,
                    do_sample=False,
                    eos_token_id=eos,
                    pad_token_id=tokenizer.pad_token_id,
                )
                for e, row in zip(chunk, out[:, length:].tolist(), strict=True):
                    stopped = eos in row
                    tokens = row[: row.index(eos)] if stopped else row
                    text = tokenizer.decode(tokens, skip_special_tokens=False)
                    results[e.index] = Prediction(e.index, e.prompt, e.completion, text, stopped)
    model.train(was_training)
    return [results[e.index] for e in examples]


@dataclass
class Scores:
    """One model's figures on the whole eval split."""

    loss: float
    metrics: dict[str, float]  # every metric of the task, its primary metric first
    predictions: list[Prediction] = field(repr=False)


@dataclass
class TaskEvaluator:
    """How one task is scored: its eval split, its kind, its metrics, the sample scored while training."""

    examples: list[Example]  # the eval split
    kind: str  # classification | generation
    metrics: list[str]  # the primary metric first
    labels: list[str] | None  # a label task's label set (every completion in the data)
    sample: list[Example]  # scored at each evaluation during training
    pad_id: int

    @property
    def primary(self) -> str:
        return self.metrics[0]

    @property
    def sampled(self) -> bool:
        """The metric during training covers a sample, not the whole eval split."""
        return len(self.sample) < len(self.examples)

    @classmethod
    def for_task(
        cls, examples: list[Example], eval_set: list[Example], *, kind: str, metric: str, limit: int | None,
        seed: int, pad_id: int,
    ) -> TaskEvaluator:
        labels = labels_of(e.completion for e in examples) if kind == "classification" else None
        sample = eval_set
        if limit is not None and len(eval_set) > limit:
            chosen = sorted(random.Random(f"metric-sample-{seed}").sample(range(len(eval_set)), limit))
            sample = [eval_set[i] for i in chosen]
        return cls(eval_set, kind, metrics_for(metric, kind), labels, sample, pad_id)

    def during_training(self, model: Any, tokenizer: Any) -> tuple[float, float]:
        """(eval loss on the whole split, primary metric on the sample)."""
        loss = eval_loss(model, self.examples, self.pad_id)
        if self.primary == "perplexity":
            return loss, perplexity(loss)
        predictions = greedy_predictions(model, tokenizer, self.sample)
        return loss, self._score([self.primary], predictions, loss)[self.primary]

    def final(self, model: Any, tokenizer: Any) -> Scores:
        """Every metric on the whole eval split."""
        loss = eval_loss(model, self.examples, self.pad_id)
        predictions = greedy_predictions(model, tokenizer, self.examples)
        return Scores(loss, self._score(self.metrics, predictions, loss), predictions)

    def _score(self, names: list[str], predictions: list[Prediction], loss: float) -> dict[str, float]:
        return compute_metrics(
            names, [p.generated for p in predictions], [p.expected for p in predictions],
            labels=self.labels, eval_loss=loss,
        )
