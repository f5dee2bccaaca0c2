"""Progress display for long jobs (rich), silent when disabled."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


@contextmanager
def progress_bar(enabled: bool, description: str, total: int) -> Iterator[Callable[[int], None]]:
    """Yields ``update(completed)``; shows a bar on stderr when ``enabled``."""
    if not enabled:
        yield lambda completed: None
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    # stderr, so that a command's output (a table, --json) stays clean when piped
    with Progress(*columns, transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task(description, total=total)
        yield lambda completed: bar.update(task, completed=completed)


def status(enabled: bool, message: str) -> Any:
    """A transient spinner with ``message`` on stderr while the block runs (a no-op when not
    ``enabled``), for steps without a count to show."""
    if not enabled:
        return nullcontext()
    return Console(stderr=True).status(message)
