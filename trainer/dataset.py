"""Task data: read records, check them against the template, split, tokenize with the prompt masked.

The prompt and the completion are tokenized separately and concatenated, so the prompt's tokens
are exactly those the server produces when it tokenizes a rendered prompt alone; EOS follows the
completion so that greedy generation learns to stop. Labels are -100 on prompt tokens: the loss
is taken on the completion (and its EOS) only.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.adapters.package.template import PromptTemplate

IGNORE_INDEX = -100


class DatasetError(ValueError):
    """The data file or one of its records is unusable; the message names the record and field."""


@dataclass(frozen=True)
class Example:
    """One record rendered and tokenized."""

    index: int  # position in the file (0-based record index)
    prompt: str
    completion: str
    input_ids: list[int]  # prompt + completion + EOS
    labels: list[int]  # IGNORE_INDEX on the prompt, the completion ids and EOS after it
    prompt_length: int


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records from a JSON array (`[{...}, ...]`) or JSONL (one object per line, blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"data file {path} not found")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}: not a valid JSON array: {exc}") from exc
        where = [f"{path}: record {i}" for i in range(len(records))]
    else:
        records, where = [], []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}: line {line_no} is not valid JSON: {exc}") from exc
            where.append(f"{path}: line {line_no} (record {len(records) - 1})")
    if not records:
        raise DatasetError(f"{path}: the dataset is empty; it needs at least one record (JSON array or JSONL)")
    for record, at in zip(records, where, strict=True):
        if not isinstance(record, dict):
            raise DatasetError(f"{at} is a {type(record).__name__}, expected an object of fields")
    return records


def check_records(
    records: list[dict[str, Any]], template: PromptTemplate, path: str | Path, *, task: str | None = None
) -> None:
    """Every field the template names exists in every record, and every completion has text.

    Errors name the task, the file, the first bad record (0-based index) and field, and the fix.
    """
    at = f"task {task!r}: {path}" if task else f"{path}"
    needed = template.prompt_fields + [f for f in template.completion_fields if f not in template.prompt_fields]
    for i, record in enumerate(records):
        for name in needed:
            if name not in record:
                have = ", ".join(sorted(record)) or "none"
                side = "prompt" if name in template.prompt_fields else "completion"
                raise DatasetError(
                    f"{at}: record {i} has no field {name!r} required by the template (record has: {have}); "
                    f"add {name!r} to every record, or change the {side} template to use the record's fields"
                )
            if record[name] is None:
                raise DatasetError(f"{at}: record {i} field {name!r} is null; give it a value or drop the record")
        if not template.render_completion(record, where=f"record {i}").strip():
            raise DatasetError(
                f"{at}: record {i} has an empty completion (completion template {template.completion!r} renders "
                "to whitespace); give the record the text the model must produce, or drop it"
            )


def split_indices(n: int, eval_split: float, seed: int, *, where: str = "dataset") -> tuple[list[int], list[int]]:
    """(train indices, eval indices): a seeded shuffle, the first round(n*eval_split) records held out.

    At least one record is held out when eval_split > 0; both lists are sorted (file order).
    """
    if n == 0:
        raise DatasetError(f"{where} is empty")
    n_eval = max(1, round(n * eval_split)) if eval_split > 0 else 0
    if n - n_eval < 1:
        raise DatasetError(
            f"{where}: eval_split={eval_split} holds out {n_eval} of {n} records and leaves no training data; "
            "add records or lower eval_split"
        )
    order = list(range(n))
    random.Random(f"eval-split-{seed}").shuffle(order)
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def held_out_records(path: str | Path, eval_split: float, seed: int) -> list[dict[str, Any]]:
    """The records a training run with this split and seed held out for evaluation, in file order."""
    records = read_records(path)
    _, held_out = split_indices(len(records), eval_split, seed, where=str(path))
    return [records[i] for i in held_out]


def tokenize_record(
    record: dict[str, Any], index: int, template: PromptTemplate, tokenizer: Any, max_length: int | None
) -> Example:
    prompt = template.render_prompt(record, where=f"record {index}")
    completion = template.render_completion(record, where=f"record {index}")
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True).input_ids)
    completion_ids = list(tokenizer(completion, add_special_tokens=False).input_ids) + [tokenizer.eos_token_id]
    input_ids = prompt_ids + completion_ids
    if max_length is not None and len(input_ids) > max_length:
        raise DatasetError(
            f"record {index} is {len(input_ids)} tokens long, over the model's limit of {max_length}; shorten it"
        )
    labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    return Example(index, prompt, completion, input_ids, labels, len(prompt_ids))


def load_examples(
    path: str | Path, template: PromptTemplate, tokenizer: Any, *, max_length: int | None = None,
    task: str | None = None,
) -> list[Example]:
    """Read, check and tokenize every record of a data file (`task` names it in errors)."""
    records = read_records(path)
    check_records(records, template, path, task=task)
    return [tokenize_record(r, i, template, tokenizer, max_length) for i, r in enumerate(records)]


def collate(examples: list[Example], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors: input_ids, attention_mask, labels (-100 on padding)."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
