"""A task's output contract, as training records it in `training.json` (and export in the manifest).

Declared in the task file (`output:` with a kind and spec, or `none`), else inferred: a label task
(completions from a small closed set, `metrics.infer_kind`'s test) gets a choice of its completions
exactly as the template renders them (leading space included), so the served output is always one
of the labels; other tasks get none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loraplex.adapters.package.output import OutputConstraint
from loraplex.trainer.config import NO_OUTPUT, TaskConfig


def output_contract(config: TaskConfig, completions: Sequence[str], kind: str) -> dict[str, Any] | None:
    """The contract to record: the declared one, else a choice of the labels for a label task, else None."""
    if config.output == NO_OUTPUT:
        return None
    if config.output is not None:
        return OutputConstraint.from_dict(config.output).to_dict()  # type: ignore[arg-type]
    if kind == "classification":
        return OutputConstraint("choice", tuple(sorted(set(completions)))).to_dict()
    return None
