"""Quality figures on the eval split: token-level loss (and perplexity), and exact match of greedy output.

Exact match is strict, as a client of the server sees it: greedy decoding from the prompt alone
must produce exactly the completion's text and then EOS. Prompts are batched only with prompts of
the same token length, so no padding enters generation and each result equals an unbatched run.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from loraplex.trainer.dataset import IGNORE_INDEX, Example, collate


@dataclass(frozen=True)
class Prediction:
    index: int
    prompt: str
    expected: str
    generated: str
    stopped: bool  # EOS was produced

    @property
    def correct(self) -> bool:
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


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


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


def exact_match(predictions: list[Prediction]) -> float:
    return sum(p.correct for p in predictions) / len(predictions) if predictions else 0.0
