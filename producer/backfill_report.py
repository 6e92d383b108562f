"""What a backfill shows as it runs and leaves behind: its summary, progress bar and rate."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)


@dataclass
class Summary:
    """What one run did; also written to the output as `summary.json`."""

    model: str
    manifest: str
    out: str
    inputs: int = 0  # manifest entries read, bad lines included
    skipped: int = 0  # already in the output (--resume)
    succeeded: int = 0
    failed: int = 0  # bad lines included
    bad_lines: int = 0
    jobs: int = 0
    published: int = 0  # inputs published as new jobs
    reused: int = 0  # inputs of jobs whose record existed (finished, queued or running)
    peak_in_flight: int = 0
    elapsed_s: float = 0.0
    inputs_per_s: float = 0.0
    complete: bool = False
    # Across every run into this output (a resumed backfill's summary is the whole one's).
    total_succeeded: int = 0
    total_failed: int = 0


def progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("backfill"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:,.0f} inputs/s"),
        TextColumn("{task.fields[failed]:,} failed"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )
