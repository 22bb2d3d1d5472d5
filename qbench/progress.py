"""Progress for long work, on stderr: a live bar on a terminal; elsewhere (a log file, CI, a pipe) a plain line
every LINE_EVERY_S seconds and one at the end, so a long step never looks hung."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator

LINE_EVERY_S = 30.0


def _lines(total: int, desc: str) -> Iterator[Callable[[int], None]]:
    start = last = time.monotonic()
    done = 0

    def say(final: bool = False) -> None:
        elapsed = time.monotonic() - start
        eta = f", eta {elapsed / done * (total - done):.0f} s" if 0 < done < total else ""
        print(f"{desc}: {done}/{total} in {elapsed:.0f} s{eta}" + (" (done)" if final else ""), file=sys.stderr,
              flush=True)

    def advance(k: int = 1) -> None:
        nonlocal done, last
        done += k
        if time.monotonic() - last >= LINE_EVERY_S:
            last = time.monotonic()
            say()

    yield advance
    say(final=True)


@contextlib.contextmanager
def bar(total: int, desc: str, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """`with bar(n, "Evaluating") as advance: ... advance(k)`."""
    if not enabled:
        yield lambda k=1: None
        return
    if not sys.stderr.isatty():
        yield from _lines(total, desc)
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(file=sys.stderr)
    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn())
    with Progress(*cols, console=console, transient=False) as p:
        task = p.add_task(desc, total=total)
        yield lambda k=1: p.advance(task, k)
