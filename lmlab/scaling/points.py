"""Points for `lmlab fit`: rows of a CSV or jsonl file, grouped by a column, checked before fitting."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from lmlab.errors import LmlabError


def read_points(path: str | Path, x: str, y: str, group: str | None = None) -> dict[str, tuple[list[float], list[float]]]:
    """{group: (xs, ys)} from a .csv or .jsonl file; a missing column or a non-number names its line."""
    path = Path(path)
    if not path.is_file():
        raise LmlabError("points file not found", file=str(path))
    if path.suffix == ".csv":
        with path.open(newline="") as fh:
            rows = [(i + 2, row) for i, row in enumerate(csv.DictReader(fh))]  # line 1 is the header
    else:
        from lmlab.data.sources import read_jsonl

        rows = list(read_jsonl(path))
    series: dict[str, tuple[list[float], list[float]]] = {}
    for line, row in rows:
        values = []
        for column in (x, y):
            if column not in row:
                raise LmlabError(f"no column '{column}'", file=str(path), line=line, field=column)
            try:
                value = float(row[column])
            except (TypeError, ValueError):
                raise LmlabError(f"'{row[column]}' is not a number", file=str(path), line=line, field=column) from None
            if not math.isfinite(value):
                raise LmlabError(f"{value} is not a finite number", file=str(path), line=line, field=column)
            values.append(value)
        key = str(row.get(group, "all")) if group else "all"
        xs, ys = series.setdefault(key, ([], []))
        xs.append(values[0])
        ys.append(values[1])
    if not series:
        raise LmlabError("the points file has no rows", file=str(path))
    return series
