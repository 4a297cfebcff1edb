"""Resumable training state: LoRA weights, optimizer, scheduler, RNG, curves and early-stopping state.

Data order is a pure function of (seed, step) (see train.py), so a run resumed from a checkpoint
takes the same batches, the same dropout draws and the same optimizer steps as one that never
stopped: the final adapter is the same, bit for bit, on the same machine.
One file per checkpoint (`step-000040.pt`), written atomically; only the newest is kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loraplex.trainer.config import ConfigError, TaskConfig

PATTERN = "step-*.pt"
# Options that do not change what training computes; a resumed run may differ in these.
NOT_COMPARED = {"resume", "checkpoint_every", "out", "data", "logging_steps", "report_to", "search"}


def latest_checkpoint(directory: Path) -> Path | None:
    files = sorted(directory.glob(PATTERN)) if directory.is_dir() else []
    return files[-1] if files else None


def save_checkpoint(directory: Path, step: int, state: dict[str, Any]) -> Path:
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step-{step:06d}.pt"
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    for old in directory.glob(PATTERN):
        if old != path:
            old.unlink()
    return path


def load_checkpoint(path: Path, config: TaskConfig) -> dict[str, Any]:
    """The saved state, after checking it was written by a run with the same training options."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    saved, now = state["config"], config.to_dict()
    for key in sorted(set(saved) | set(now)):
        if key not in NOT_COMPARED and saved.get(key) != now.get(key):
            raise ConfigError(
                f"checkpoint {path} was written with {key}={saved.get(key)!r} but this run has "
                f"{key}={now.get(key)!r}; resume with the same options or delete {path.parent} to start over"
            )
    return state
