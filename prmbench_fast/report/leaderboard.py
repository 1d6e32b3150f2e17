"""The published PRMBench leaderboard (package data ``leaderboard.tsv``, with its source) and a run's row among it."""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Mapping

from ..ratios import TABLE_COLUMNS

LEADERBOARD_FILE = pathlib.Path(__file__).with_name("leaderboard.tsv")
#: Baseline rows computed by the evaluator on the run's data (``analysis["baselines"]``), as they are named in tables.
BASELINE_NAMES = {"all_positive": "all steps positive", "all_negative": "all steps negative"}


@dataclasses.dataclass(frozen=True)
class Row:
    """One leaderboard line: ``kind`` is the published class (PRM, LM-O, LM-C), "run" or "baseline"."""

    name: str
    kind: str
    table: Mapping[str, float | None]


@functools.cache
def published() -> tuple[tuple[Row, ...], str]:
    """The published rows (leaderboard order) and the source note of the file."""
    rows, source = [], []
    for line in LEADERBOARD_FILE.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            source.append(line.lstrip("# "))
        elif line.startswith("Model\t"):
            header = line.split("\t")
            if header[2:] != list(TABLE_COLUMNS):
                raise ValueError(f"{LEADERBOARD_FILE}: columns {header[2:]} are not {list(TABLE_COLUMNS)}")
        elif line.strip():
            name, kind, *values = line.split("\t")
            rows.append(Row(name, kind, dict(zip(TABLE_COLUMNS, map(float, values)))))
    return tuple(rows), " ".join(source)


def ranked(runs: Mapping[str, Mapping[str, float | None]], baselines: Mapping[str, Mapping] | None = None) -> list[Row]:
    """The published rows, the runs' rows and the baseline rows, by Overall (best first; ties keep that order)."""
    rows = list(published()[0])
    rows += [Row(name, "run", table) for name, table in runs.items()]
    rows += [Row(BASELINE_NAMES[k], "baseline", t) for k, t in (baselines or {}).items() if k in BASELINE_NAMES]
    return sorted(rows, key=lambda r: -(r.table["Overall"] or 0.0))


def leaderboard_text(runs: Mapping[str, Mapping[str, float | None]], baselines: Mapping[str, Mapping] | None = None) -> str:
    """The runs among the published leaderboard as a text table (×100, one decimal), the runs marked with ">>"."""
    rows = ranked(runs, baselines)
    width = max(len(r.name) for r in rows)
    columns = [c.rjust(5) for c in TABLE_COLUMNS]
    header = f"   {'model'.ljust(width)}  {'class':8} " + " ".join(columns)
    lines = [header, "-" * len(header)]
    for row in rows:
        mark = ">> " if row.kind == "run" else "   "
        cells = " ".join(("-" if row.table[c] is None else f"{row.table[c]:.1f}").rjust(5) for c in TABLE_COLUMNS)
        lines.append(f"{mark}{row.name.ljust(width)}  {row.kind:8} {cells}")
    return "\n".join(lines)
