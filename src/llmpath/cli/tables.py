"""Printing tables whole: a table wider than the terminal (80 columns when output is piped) is printed at its own
width instead of losing columns — rich shrinks the columns that may wrap to nothing."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

_UNBOUNDED = 100_000


def print_table(console: Console, table: Table) -> None:
    """Print ``table`` with every column, at the console's width or the table's own when that is wider (long lines
    then wrap in a narrow terminal; files and pipes get them whole)."""
    width = console.width
    natural = console.measure(table, options=console.options.update_width(_UNBOUNDED)).maximum
    if natural <= width:
        console.print(table)
        return
    console.width = natural
    try:
        console.print(table)
    finally:
        console.width = width
