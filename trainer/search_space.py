"""The hyper-parameter search space of a task: which options `loraplex train --search N` varies, over what.

Read from a task file's `search:` mapping (in `defaults`, per task, or both: the task's keys win):

    search:
      learning_rate: [0.0003, 0.01]      # a range [low, high], sampled on a log scale
      rank: [4, 8, 16]                   # choices
      alpha: [8, 16, 32]                 # choices
      target_modules: [[q_proj, v_proj], all]   # choices: lists of modules, or all (every projection)
      max_steps: [100, 400]              # a range of step budgets, log scale; early stopping still applies
      batch_size: [8, 16]                # choices
      dropout: [0.0, 0.1]                # a range, uniform

A `search:` mapping lists exactly the options searched; the others keep the task's value. Without
one, `--search` uses DEFAULT_SPACE. A key set to null is not searched. Stdlib only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ALL_MODULES = "all"


class SearchSpaceError(ValueError):
    """A search space is invalid; the message names the parameter and the fix (wrapped in ConfigError)."""


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class SearchSpace:
    """Ranges are [low, high] (both included); choices are non-empty lists. None: not searched."""

    learning_rate: list[float] | None = field(default=None, metadata=_help("range [low, high], log scale"))
    rank: list[int] | None = field(default=None, metadata=_help("choices of LoRA rank"))
    alpha: list[float] | None = field(default=None, metadata=_help("choices of LoRA alpha"))
    target_modules: list[list[str] | str] | None = field(
        default=None, metadata=_help("choices: a list of module names, or 'all' (every projection)")
    )
    max_steps: list[int] | None = field(default=None, metadata=_help("range [low, high] of step budgets, log scale"))
    batch_size: list[int] | None = field(default=None, metadata=_help("choices of micro-batch size"))
    dropout: list[float] | None = field(default=None, metadata=_help("range [low, high] of LoRA dropout"))

    RANGES = ("learning_rate", "max_steps", "dropout")

    def __post_init__(self) -> None:
        self.validate()

    def params(self) -> list[str]:
        """The names of the searched options, in field order."""
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def validate(self) -> None:
        if not self.params():
            raise SearchSpaceError("the search space searches nothing; give at least one option, e.g. learning_rate")
        for name in self.params():
            value = getattr(self, name)
            if not isinstance(value, list) or not value:
                kind = "a range [low, high]" if name in self.RANGES else "a non-empty list of choices"
                raise SearchSpaceError(f"search {name} is {value!r}: it needs {kind}")
            if name in self.RANGES:
                self._check_range(name, value)
            else:
                self._check_choices(name, value)

    def _check_range(self, name: str, value: list[Any]) -> None:
        if len(value) != 2 or not all(_is_number(v) for v in value):
            raise SearchSpaceError(f"search {name} is {value!r}: it needs a range of two numbers [low, high]")
        low, high = value
        if low >= high:
            raise SearchSpaceError(
                f"search {name} range [{low}, {high}] is empty: low must be below high (e.g. [{low}, {low * 10 or 1}])"
            )
        if name == "learning_rate" and low <= 0:
            raise SearchSpaceError(f"search learning_rate range starts at {low}; a log-scale range needs low > 0")
        if name == "max_steps" and (not all(isinstance(v, int) for v in value) or low < 1):
            raise SearchSpaceError(f"search max_steps range {value!r} needs whole numbers of steps >= 1")
        if name == "dropout" and not (low >= 0 and high < 1):
            raise SearchSpaceError(f"search dropout range {value!r} must lie within [0, 1)")

    def _check_choices(self, name: str, value: list[Any]) -> None:
        if name == "target_modules":
            for choice in value:
                if choice != ALL_MODULES and (not isinstance(choice, list) or not choice):
                    raise SearchSpaceError(
                        f"search target_modules choice {choice!r} is neither a non-empty list of module names "
                        f"nor {ALL_MODULES!r}"
                    )
            return
        integer = name in ("rank", "batch_size")
        for choice in value:
            if not _is_number(choice) or choice <= 0 or (integer and not isinstance(choice, int)):
                kind = "positive whole numbers" if integer else "positive numbers"
                raise SearchSpaceError(f"search {name} choice {choice!r} is invalid: {name} choices are {kind}")
        if len(set(value)) != len(value):
            raise SearchSpaceError(f"search {name} lists a choice twice: {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.params()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchSpace:
        if not isinstance(data, Mapping):
            raise SearchSpaceError(f"search must be a mapping of option -> range or choices, got {data!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise SearchSpaceError(f"search option {unknown[0]!r} is unknown; searchable options: {', '.join(names)}")
        return cls(**{k: list(v) if isinstance(v, tuple) else v for k, v in data.items()})


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# Used by `--search N` when the task file names no search space: the options that matter most for
# LoRA on small data, over ranges that hold the good values of tiny and ~100M-parameter models.
DEFAULT_SPACE: dict[str, Any] = {"learning_rate": [1e-4, 1e-2], "rank": [4, 8, 16], "batch_size": [8, 16]}
