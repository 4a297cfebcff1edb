"""Markdown cells and tables shared by the RESULTS.md sections of both parts."""

from __future__ import annotations

import math


def num(value, digits: int = 1, unit: str = "") -> str:
    """A number with thousands separators and `digits` decimals; "—" for a missing value, a string as is."""
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    return f"{value:,.{digits}f}{unit}"


def ratio(a, b) -> str:
    """a / b as "1.23x"; "—" when either is missing or b is 0."""
    return f"{a / b:.2f}x" if a is not None and b not in (None, 0) else "—"


def ratio_text(value: float, at_least: bool = True) -> str:
    """A ratio to 2 decimals for a target's row, rounded away from the target (down for "at least", up
    for "at most"), so the figure shown never meets a target the exact one misses (2.996 shows 2.99x)."""
    hundredths = math.floor(value * 100) if at_least else math.ceil(value * 100)
    return f"{hundredths / 100:.2f}x"


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines, then a blank line."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def load_average(value) -> str:
    """`os.getloadavg()`'s (1, 5, 15 minutes) as "1.41 / 1.75 / 1.80"; "—" when missing."""
    if not value:
        return "—"
    return " / ".join(f"{v:.2f}" for v in value)
