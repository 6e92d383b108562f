"""The embedded broker's event files: those of receivers long gone are pruned, nothing else."""

from __future__ import annotations

import os
import time
from pathlib import Path

from pipeq.worker.event_files import STALE_AFTER_S, prune_event_files


def _message(folder: Path, queue: str, age_s: float) -> Path:
    path = folder / f"{int(time.monotonic() * 1000)}_{os.urandom(4).hex()}.{queue}.msg"
    path.write_text("{}")
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def test_only_stale_event_files_go(tmp_path: Path) -> None:
    stale = [_message(tmp_path, "celeryev.4f1c", STALE_AFTER_S + 5) for _ in range(3)]
    fresh = _message(tmp_path, "celeryev.4f1c", 1)
    old_job = _message(tmp_path, "pipeq.tiny-sentiment.bulk", 3600)
    assert prune_event_files(tmp_path) == 3
    assert not any(path.exists() for path in stale)
    assert fresh.exists() and old_job.exists()
