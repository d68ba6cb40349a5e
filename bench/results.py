"""One format for every bench's entry in ``bench/RESULTS.md``."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

from rich.console import Console
from rich.table import Table


def record(
    path: Path, name: str, table: Table, width: int = 120, image: Path | None = None
) -> None:
    """Append ``table`` (and a link to ``image``, written beside ``path``) under a heading
    naming the bench and the time."""
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(table)
    with path.open("a") as f:
        f.write(f"\n## {name}, {dt.datetime.now().isoformat(timespec='minutes')}\n\n")
        if image is not None:
            f.write(f"![{name}]({image.name})\n\n")
        f.write("```\n" + console.export_text() + "```\n")
