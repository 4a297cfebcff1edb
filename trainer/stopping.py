"""One task's training progress: curves, the best evaluation, early stopping and the plateau verdict.

No torch here: the rules are tested on made-up histories.

- Best evaluation (the weights kept): the best eval metric; among equal values, the lower eval loss.
- Early stopping: stop after `patience` evaluations in which neither the metric nor the eval loss
  reached a new best. Exact match or accuracy on a small eval split moves in steps and can sit
  still while the model is still learning, which the eval loss shows; once the metric is perfect
  (1.0) only the metric counts, since no further evaluation can beat it.
- Plateau: the metric plateaued when its best value was first reached at least `patience`
  evaluations before training ended (or 3 when early stopping is off), or when it is perfect.
  Otherwise training ended (budget or timeout) while the metric may still improve: raise max_steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from loraplex.trainer.metrics import better, is_perfect

StopReason = Literal["budget", "early_stopping", "timeout"]
# Evaluations after the best one that make a plateau when early stopping is off.
PLATEAU_WINDOW = 3


@dataclass
class TrainingState:
    """Everything a checkpoint restores besides the tensors' owners (model, optimizer, scheduler)."""

    metric: str  # the primary eval metric's name
    patience: int | None
    total_steps: int
    step: int = 0
    train_loss: list[list[float]] = field(default_factory=list)  # [step, mean loss since the last entry]
    pending_loss: list[float] = field(default_factory=list)  # train losses not yet logged
    eval_loss: list[list[float]] = field(default_factory=list)  # [step, loss]
    eval_metric: list[list[float]] = field(default_factory=list)  # [step, value]
    best_step: int | None = None
    best_metric: float | None = None
    best_loss: float = math.inf  # the eval loss at the best evaluation
    lowest_loss: float = math.inf
    first_best_step: int | None = None  # when the best metric value was first reached
    best_state: dict[str, Any] | None = None
    evals_without_improvement: int = 0
    stop_reason: StopReason | None = None

    @property
    def stopped(self) -> bool:
        return self.stop_reason is not None

    def log_train_loss(self, loss: float, every: int) -> float | None:
        """Add this step's loss; every `every` steps (and at the budget's end) the mean is logged and returned."""
        self.pending_loss.append(loss)
        if len(self.pending_loss) < every and self.step < self.total_steps:
            return None
        mean = sum(self.pending_loss) / len(self.pending_loss)
        self.train_loss.append([self.step, mean])
        self.pending_loss = []
        return mean

    def flush_train_loss(self) -> None:
        """Log what is pending when training ends before the next logging step."""
        if self.pending_loss:
            self.train_loss.append([self.step, sum(self.pending_loss) / len(self.pending_loss)])
            self.pending_loss = []

    def record_eval(self, loss: float, value: float) -> bool:
        """Record an evaluation at the current step; True when it is the new best (the caller keeps its weights
        in `best_state`)."""
        self.eval_loss.append([self.step, loss])
        self.eval_metric.append([self.step, value])
        metric_improved = better(self.metric, value, self.best_metric)
        tie_lower_loss = value == self.best_metric and loss < self.best_loss
        perfect = self.best_metric is not None and is_perfect(self.metric, self.best_metric)
        loss_improved = loss < self.lowest_loss and not perfect
        self.lowest_loss = min(self.lowest_loss, loss)
        if metric_improved:
            self.first_best_step = self.step
        is_best = metric_improved or tie_lower_loss
        if is_best:
            self.best_step, self.best_metric, self.best_loss = self.step, value, loss
        if metric_improved or loss_improved:
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1
            if self.patience is not None and self.evals_without_improvement >= self.patience:
                self.stop_reason = "early_stopping"
        return is_best

    def finish(self) -> None:
        self.flush_train_loss()
        if self.stop_reason is None:
            self.stop_reason = "budget"

    def evals_since_best(self) -> int:
        if self.first_best_step is None:
            return 0
        return sum(1 for step, _ in self.eval_metric if step > self.first_best_step)

    def plateau(self) -> tuple[bool | None, str]:
        """(plateaued, a sentence for people): None when there was nothing to evaluate."""
        if not self.eval_metric:
            return None, "no eval split: nothing tells whether training plateaued"
        value, at = f"{self.best_metric:.4g}", f"at step {self.first_best_step}"
        best = f"best {self.metric} {value} {at}"
        if is_perfect(self.metric, self.best_metric):
            return True, f"{self.metric} reached {value}, the best possible, {at}"
        window = self.patience or PLATEAU_WINDOW
        since = self.evals_since_best()
        if self.stop_reason == "early_stopping" or since >= window:
            return True, f"{self.metric} plateaued: {best}, then {since} evaluations without a better one"
        ended = "the search's time limit" if self.stop_reason == "timeout" else f"the {self.total_steps}-step budget"
        return False, (
            f"{self.metric} may still improve: {ended} ended training {since} evaluation(s) after its {best}, "
            f"fewer than the {window} that make a plateau; raise max_steps"
        )

    _SAVED = ("step", "train_loss", "pending_loss", "eval_loss", "eval_metric", "best_step", "best_metric",
              "best_loss", "lowest_loss", "first_best_step", "best_state", "evals_without_improvement",
              "stop_reason")  # fmt: skip

    def snapshot(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._SAVED}

    def restore(self, saved: dict[str, Any]) -> None:
        for name in self._SAVED:
            setattr(self, name, saved[name])
