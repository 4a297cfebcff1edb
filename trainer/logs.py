"""TensorBoard event files for one training run (`report_to: tensorboard`).

Scalars: `train/loss` (the mean over each logging interval), `train/learning_rate`, `eval/loss` and
`eval/<metric>` at each evaluation, and at the end `final/<metric>` for every metric with and
without the adapter. torch.utils.tensorboard writes them (it needs the `tensorboard` package, part of
the `train` extra); `tensorboard --logdir OUT` shows every task and search trial side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TENSORBOARD_DIR = "tensorboard"


class TrainingLog:
    """Writes scalars when TensorBoard is on; does nothing otherwise."""

    def __init__(self, directory: Path | None, *, purge_step: int | None = None) -> None:
        self.directory = directory
        self._writer: Any = None
        if directory is not None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run drops events written after its checkpoint by the run it replaces.
            self._writer = SummaryWriter(log_dir=str(directory), purge_step=purge_step)

    def train(self, step: int, loss: float, learning_rate: float) -> None:
        if self._writer is not None:
            self._writer.add_scalar("train/loss", loss, step)
            self._writer.add_scalar("train/learning_rate", learning_rate, step)

    def evaluation(self, step: int, loss: float, metric: str, value: float) -> None:
        if self._writer is not None:
            self._writer.add_scalar("eval/loss", loss, step)
            self._writer.add_scalar(f"eval/{metric}", value, step)

    def final(self, step: int, metrics: dict[str, float], base_metrics: dict[str, float]) -> None:
        if self._writer is not None:
            for name, value in metrics.items():
                self._writer.add_scalar(f"final/{name}", value, step)
            for name, value in base_metrics.items():
                self._writer.add_scalar(f"final/base_{name}", value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
