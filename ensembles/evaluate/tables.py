"""Numbers as report text: a value with its 95% CI, and markdown tables."""

from __future__ import annotations

from collections.abc import Sequence


def fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def fmt_ci(x: float | None, ci: Sequence[float] | None) -> str:
    return fmt(x) if ci is None else f"{fmt(x)} ({fmt(ci[0])}-{fmt(ci[1])})"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]
