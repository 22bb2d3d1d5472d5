"""Progress bars for long work (rich, on stderr; silent when disabled or not a terminal-friendly run)."""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator


@contextlib.contextmanager
def bar(total: int, desc: str, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """`with bar(n, "Evaluating") as advance: ... advance(k)`."""
    if not enabled:
        yield lambda k=1: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(file=sys.stderr)
    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn())
    with Progress(*cols, console=console, transient=False) as p:
        task = p.add_task(desc, total=total)
        yield lambda k=1: p.advance(task, k)
