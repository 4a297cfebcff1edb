"""PNG plots of the concurrency scenario: throughput and latency percentiles per system."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("bench.plots")


def _series(rows: list[dict], key: str) -> dict[int, dict[str, list[tuple[int, float]]]]:
    """adapters -> system -> [(clients, value)] for rows that measured `key`."""
    out: dict[int, dict[str, list[tuple[int, float]]]] = {}
    for row in rows:
        if row.get(key) is None:
            continue
        out.setdefault(row["adapters"], {}).setdefault(row["system"], []).append((row["clients"], row[key]))
    return out


def _client_ticks(ax, rows: list[dict]) -> None:
    clients = sorted({r["clients"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(clients, [str(c) for c in clients])
    ax.minorticks_off()


def _panel(ax, spread: int, rows: list[dict]) -> None:
    """What every per-spread panel shares: title, x axis, grid."""
    ax.set_title(f"requests over {spread} adapter{'s' if spread > 1 else ''}")
    ax.set_xlabel("concurrent clients")
    _client_ticks(ax, rows)
    ax.grid(alpha=0.3)


def _save(fig, axes, plt, ylabel: str, legend_size: int, title: str, path: Path) -> Path:
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=legend_size)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(results: dict, out_dir: Path) -> list[Path]:
    """Write the plots this run has data for; returns their paths (none without matplotlib)."""
    rows = results.get("concurrency") or []
    if not rows:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    throughput = _series(rows, "tokens_per_s")
    spreads = sorted(throughput)
    roof = (results.get("roofline") or {}).get("fp32", {}).get("tokens_per_s")

    fig, axes = plt.subplots(1, len(spreads), figsize=(5 * len(spreads), 4), squeeze=False, sharey=True)
    for ax, spread in zip(axes[0], spreads, strict=True):
        for system, points in sorted(throughput[spread].items()):
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, marker="o", label=system)
        if roof:
            ax.axhline(roof, color="grey", linestyle=":", label="batch-1 bandwidth roofline")
        _panel(ax, spread, rows)
    paths.append(_save(fig, axes, plt, "throughput (completion tokens/s)", 8,
                       "Throughput vs concurrency (fp32, 32 new tokens, greedy)",
                       out_dir / "throughput_vs_concurrency.png"))

    p50, p99 = _series(rows, "p50_s"), _series(rows, "p99_s")
    fig, axes = plt.subplots(1, len(spreads), figsize=(5 * len(spreads), 4), squeeze=False, sharey=True)
    for ax, spread in zip(axes[0], spreads, strict=True):
        for i, (system, points) in enumerate(sorted(p50.get(spread, {}).items())):
            color = f"C{i}"
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, marker="o", color=color, label=f"{system} p50")
            if system in p99.get(spread, {}):
                xs, ys = zip(*sorted(p99[spread][system]), strict=True)
                ax.plot(xs, ys, marker="x", linestyle="--", color=color, label=f"{system} p99")
        _panel(ax, spread, rows)
        ax.set_yscale("log")
    paths.append(_save(fig, axes, plt, "request latency (s)", 7,
                       "Latency percentiles vs concurrency (p50 solid, p99 dashed)",
                       out_dir / "latency_percentiles.png"))
    return paths
