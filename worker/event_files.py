"""Pruning the embedded broker's stale event files. kombu's filesystem transport keeps a fanout
binding for every event receiver that ever ran (Flower, `celery events`) and copies each task
event into a file for it, also after that receiver stopped: they piled up in the data folder.
Events are only worth anything for seconds, so files of event queues older than a minute go."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

STALE_AFTER_S = 60.0
PRUNE_EVERY_S = 30.0


def prune_event_files(folder: Path, now: float | None = None) -> int:
    """Remove event messages older than STALE_AFTER_S from `folder`; returns how many."""
    cutoff = (time.time() if now is None else now) - STALE_AFTER_S
    removed = 0
    # kombu names a message `<ms>_<uuid>.<queue>.msg`; event receivers' queues are celeryev.<id>.
    for path in folder.glob("*.celeryev.*.msg"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue  # taken by a receiver meanwhile
    return removed


def start_pruning(folder: Path) -> threading.Event:
    """Prune `folder` every PRUNE_EVERY_S on a daemon thread; set the event to stop it."""
    stopped = threading.Event()

    def loop() -> None:
        while not stopped.wait(PRUNE_EVERY_S):
            try:
                prune_event_files(folder)
            except OSError as exc:
                log.warning("event files in %s not pruned: %r", folder, exc)

    threading.Thread(target=loop, name="event-file-pruner", daemon=True).start()
    return stopped
