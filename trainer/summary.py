"""The table printed after training: one row per task, the figures that say whether it learned."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_summary(results: Sequence[Any], console: Any = None) -> None:
    """Task, steps, final train loss, eval loss, perplexity, exact match (adapter vs base), time."""
    from rich.console import Console
    from rich.table import Table

    folders = sorted({str(result.adapter_dir.parent) for result in results})
    table = Table(title="loraplex train", caption="adapters in " + ", ".join(folders))
    for name in ("task", "steps", "train loss", "eval loss", "eval ppl", "exact match", "base EM", "time"):
        table.add_column(name, justify="left" if name == "task" else "right", no_wrap=name == "task")
    for result in results:
        t = result.training
        last_train = t["train_loss"][-1][1] if t["train_loss"] else None
        steps = f"{t['steps']}" + (" (early stop)" if t["stopped_early"] else "")
        table.add_row(
            t["task"],
            steps,
            _fmt(last_train, ".4f"),
            _fmt(t["final_eval_loss"], ".4f"),
            _fmt(t["eval_perplexity"], ".3f"),
            _fmt(t["eval_exact_match"], ".1%"),
            _fmt(t["base_eval_exact_match"], ".1%"),
            f"{t['wall_time_s']:.1f}s",
        )
    (console or Console()).print(table)
