"""What `loraplex train` prints at the end: one row per task, a note for every task that stopped before its
eval metric plateaued, a table of trials per searched task, and the total time. Tables fit 80 columns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _value(metric: str, value: float | None) -> str:
    return _fmt(value, ".4g" if metric == "perplexity" else ".3f")


def _metric(training: dict[str, Any], which: str) -> float | None:
    values = training.get(which) or {}
    return values.get(training.get("metric"))


STOPS = {"early_stopping": "early", "budget": "budget", "timeout": "timeout"}


def print_summary(
    results: Sequence[Any], console: Any = None, *, total_s: float | None = None, base_load_s: float | None = None
) -> None:
    """Task, metric (adapter vs base), eval loss, steps and why training stopped, time; then notes."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    folders = sorted({str(result.adapter_dir.parent) for result in results})
    table = Table(title="loraplex train", caption="adapters in " + ", ".join(folders))
    for name in ("task", "metric", "adapter", "base", "eval loss", "steps", "end", "time"):  # end: why training stopped
        table.add_column(name, justify="left" if name in ("task", "metric") else "right", no_wrap=name == "task")
    notes = []
    for result in results:
        t = result.training
        table.add_row(
            t["task"],
            t["metric"],
            _value(t["metric"], _metric(t, "eval_metrics")),
            _value(t["metric"], _metric(t, "base_eval_metrics")),
            _fmt(t["final_eval_loss"], ".4f"),
            str(t["steps"]),
            STOPS.get(t["stop_reason"], t["stop_reason"]),
            f"{t['search']['wall_time_s'] if 'search' in t else t['wall_time_s']:.1f}s",  # a search: all its trials
        )
        if not t["plateaued"]:
            notes.append(f"{t['task']}: {t['plateau_note']}")
        sample = t["metric_sample"]
        if sample["records"] < sample["of"]:
            notes.append(f"{t['task']}: {t['metric']} during training scored on {sample['records']} of "
                         f"{sample['of']} eval records (eval_metric_limit); final figures on all")  # fmt: skip
    console.print(table)
    for note in notes:
        console.print(f"[yellow]note[/] {note}", highlight=False)
    for result in results:
        if "search" in result.training:
            print_trials(result.training, console)
    if total_s is not None:
        load = f" (base model loaded once, {base_load_s:.1f}s)" if base_load_s is not None else ""
        console.print(f"{len(results)} task(s) in {total_s:.1f}s{load}", highlight=False)


PARAM_COLUMNS = {"learning_rate": "lr", "rank": "r", "alpha": "alpha", "target_modules": "modules",
                 "max_steps": "budget", "batch_size": "batch", "dropout": "drop"}  # fmt: skip


def format_param(name: str, value: Any) -> str:
    """A trial's value, short: 3.0e-04, q,v (for q_proj,v_proj), 0.07."""
    if name == "learning_rate":
        return f"{value:.1e}"
    if name == "dropout":
        return f"{value:.2f}"
    if name == "target_modules":
        return ",".join(m.removesuffix("_proj") for m in str(value).split(","))
    return f"{value:g}" if isinstance(value, float) else str(value)


def print_trials(training: dict[str, Any], console: Any) -> None:
    """The search's trials, the kept one marked with *."""
    from rich import box
    from rich.table import Table

    search = training["search"]
    names = [n for n in PARAM_COLUMNS if n in search["space"]]
    table = Table(
        title=f"search: {training['task']} ({search['trials_run']} of {search['trials_requested']} trials, "
        f"{search['wall_time_s']:.0f}s{', timed out' if search['timed_out'] else ''})",
        caption=f"* kept: best {search['metric']} on the eval split (ties: lower eval loss); {search['sampler']}",
        box=box.SIMPLE_HEAD,
    )
    table.add_column("#", justify="right")
    for name in names:
        table.add_column(PARAM_COLUMNS[name], justify="right")
    for name in (search["metric"], "eval loss", "steps", "time"):
        table.add_column(name, justify="right")
    for row in search["trials"]:
        mark = "*" if row["trial"] == search["best_trial"] else ""
        params = [format_param(n, row["params"][n]) if n in row["params"] else "-" for n in names]
        table.add_row(f"{mark}{row['trial']}", *params, _value(search["metric"], row["metric"]),
                      _fmt(row["eval_loss"], ".3f"), str(row["steps"]), f"{row['time_s']:.1f}s")  # fmt: skip
    console.print(table)
