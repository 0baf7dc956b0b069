"""A rich progress bar that shows the latest metrics, and a final metrics table."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)


def _format(metrics: Mapping[str, float]) -> str:
    return "  ".join(f"{k}={v:.4g}" for k, v in metrics.items())


@contextmanager
def training_progress(title: str, total: int, quiet: bool = False) -> Iterator:
    """Yields `advance(metrics)`, to be called once per iteration."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[metrics]}"),
        console=console,
        disable=quiet,
        transient=False,
    )
    with progress:
        task = progress.add_task(title, total=total, metrics="")

        def advance(metrics: Mapping[str, float] | None = None) -> None:
            progress.update(task, advance=1, metrics=_format(metrics or {}))

        yield advance


def print_metrics(title: str, metrics: Mapping[str, float]) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.6g}")
    Console().print(table)
