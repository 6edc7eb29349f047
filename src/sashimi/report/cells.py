"""Table cells: our number beside the published one, and the table that holds them.

A value this pipeline has not produced renders as an em dash, never as a number; a row the
paper has but this pipeline does not run shows "n/a". Published values stand beside ours as
"ours (paper)"; values the reference file marks `recalled` carry a dagger.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

MISSING = "—"  # em dash: not computed (yet)
NOT_RUN = "n/a"  # the paper has this row, this pipeline has no such run
DAGGER = "†"


def num(x: Any) -> float | None:
    """A finite float, else None (absent, null, NaN, non-numeric all read as missing)."""
    if isinstance(x, bool) or x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def fmt(v: float, digits: int) -> str:
    if abs(v) >= 1e4 or (digits == 0 and abs(v) >= 1e3):
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


@dataclass
class Cell:
    """One result: ours beside the published value."""

    ours: float | None = None  # None: missing
    paper: float | None = None
    recalled: bool = False
    digits: int = 3
    applicable: bool = True  # False: no such run in this pipeline ("n/a")

    def ours_text(self) -> str:
        if not self.applicable:
            return NOT_RUN
        v = num(self.ours)
        return MISSING if v is None else fmt(v, self.digits)

    def paper_text(self, dagger: str = DAGGER) -> str:
        if self.paper is None:
            return ""
        return fmt(self.paper, self.digits) + (dagger if self.recalled else "")

    def text(self, dagger: str = DAGGER) -> str:
        p = self.paper_text(dagger)
        return f"{self.ours_text()} ({p})" if p else self.ours_text()


@dataclass(frozen=True)
class Heading:
    """A row that opens a section of a table (e.g. "later work on this benchmark")."""

    text: str


Row = list  # list[str | Cell], or [Heading]


@dataclass
class Table:
    key: str
    title: str
    headers: list[str]
    rows: list[Row]
    notes: list[str] = field(default_factory=list)

    def data_rows(self) -> list[Row]:
        return [r for r in self.rows if not is_heading(r)]

    def any_recalled(self) -> bool:
        return any(
            isinstance(c, Cell) and c.recalled and c.paper is not None
            for r in self.data_rows()
            for c in r
        )

    def has_paper(self, col: int) -> bool:
        """Whether column `col` holds any published value (CSV gives it a paper column)."""
        return any(isinstance(r[col], Cell) and r[col].paper is not None for r in self.data_rows())

    def sections(self) -> bool:
        return any(is_heading(r) for r in self.rows)


def is_heading(row: Row) -> bool:
    return len(row) == 1 and isinstance(row[0], Heading)
