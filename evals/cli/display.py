"""Terminal display shared by the commands: rich tables sized for terminals and CI logs."""

from __future__ import annotations

import sys
from typing import Any


def rich_table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        left = c in ("model", "preset", "family", "layers", "variant", "run_id", "budget")
        table.add_column(c, justify="left" if left else "right")
    for row in rows:
        table.add_row(*["-" if row.get(c) is None else str(row.get(c)) for c in columns])
    # Off a terminal (CI logs, pipes) rich would wrap at 80 columns and elide numbers.
    Console(width=None if sys.stdout.isatty() else 200).print(table)
