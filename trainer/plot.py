"""`curves.png` beside each adapter: train and eval loss per step, and the eval metric per evaluation.

matplotlib with the Agg canvas, imported here only (no display, no global pyplot state), so a
trainer on a headless machine writes the same file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CURVES_PNG = "curves.png"


def plot_curves(training: dict[str, Any], path: Path) -> Path:
    """Two panels from a training.json dict: losses (log scale) and the eval metric; the kept step marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(figure)
    losses, metric = figure.subplots(1, 2)
    best = training.get("best_step")
    _panel(losses, "loss per completion token", [
        ("train", training["train_loss"], "-"),
        ("eval", training["eval_loss"], "o-"),
    ], best, log=True)
    name = training.get("metric") or "metric"
    _panel(metric, f"eval {name}", [(name, training.get("eval_metric_curve") or [], "o-")], best)
    stop = {"early_stopping": "early stopping", "budget": "the step budget", "timeout": "the time limit"}
    title = f"{training['task']}: {training['steps']} steps, ended by {stop.get(training.get('stop_reason'), '?')}"
    figure.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def _panel(axes: Any, title: str, series: list[tuple[str, list[list[float]], str]], best: int | None,
           log: bool = False) -> None:
    for label, points, style in series:
        if points:
            axes.plot([s for s, _ in points], [v for _, v in points], style, label=label, markersize=3)
    if best is not None:
        axes.axvline(best, color="grey", linestyle=":", label=f"kept (step {best})")
    if log and any(points for _, points, _ in series):
        axes.set_yscale("log")
    axes.set_title(title)
    axes.set_xlabel("optimizer step")
    axes.grid(alpha=0.3)
    axes.legend()
