"""Job records in a SQLite file: the embedded single-machine setup's result store (no Redis)."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from pipeq.core.jobs import JobDocument


class SqliteRecords:
    """The embedded default: one file, shared by the API, the client and the worker."""

    def __init__(self, path: Path, ttl_s: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._ttl_s = ttl_s
        self._local = threading.local()
        with self._db() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, status TEXT, doc TEXT, "
                "fp TEXT, expires_at REAL)"
            )

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self._path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            self._local.db = db
        return db

    def _create(self, doc: JobDocument, fingerprint: str) -> tuple[JobDocument, str] | None:
        db = self._db()
        db.execute("DELETE FROM jobs WHERE id = ? AND expires_at < ?", (doc.id, time.time()))
        cursor = db.execute(
            "INSERT OR IGNORE INTO jobs VALUES (?, ?, ?, ?, ?)",
            (doc.id, doc.status, doc.model_dump_json(), fingerprint, time.time() + self._ttl_s),
        )
        if cursor.rowcount:
            return None
        row = db.execute("SELECT doc, fp FROM jobs WHERE id = ?", (doc.id,)).fetchone()
        return JobDocument.model_validate_json(row[0]), row[1]

    def create_many(
        self, entries: list[tuple[JobDocument, str, str]]
    ) -> list[tuple[JobDocument, str] | None]:
        # The embedded broker keeps no message in flight outside its files: nothing to keep.
        return [self._create(doc, fingerprint) for doc, fingerprint, _ in entries]

    def delete(self, job_id: str) -> None:
        self._db().execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def get(self, job_id: str) -> JobDocument | None:
        row = (
            self._db()
            .execute("SELECT doc FROM jobs WHERE id = ? AND expires_at >= ?", (job_id, time.time()))
            .fetchone()
        )
        return None if row is None else JobDocument.model_validate_json(row[0])

    def transition(
        self, doc: JobDocument, from_statuses: tuple[str, ...], deliveries: int | None = None
    ) -> tuple[bool, JobDocument | None]:
        marks = ",".join("?" * len(from_statuses))
        held = "" if deliveries is None else " AND IFNULL(json_extract(doc, '$.deliveries'), 0) = ?"
        cursor = self._db().execute(
            "UPDATE jobs SET status = ?, doc = ?, expires_at = ? "
            f"WHERE id = ? AND status IN ({marks}){held}",
            (
                doc.status,
                doc.model_dump_json(),
                time.time() + self._ttl_s,
                doc.id,
                *from_statuses,
                *([] if deliveries is None else [deliveries]),
            ),
        )
        if cursor.rowcount:
            return True, doc
        return False, self.get(doc.id)

    def put(self, doc: JobDocument) -> None:
        self._db().execute(
            "INSERT INTO jobs VALUES (?, ?, ?, '', ?) ON CONFLICT(id) DO UPDATE SET "
            "status = excluded.status, doc = excluded.doc, expires_at = excluded.expires_at",
            (doc.id, doc.status, doc.model_dump_json(), time.time() + self._ttl_s),
        )

    def get_many(self, job_ids: list[str]) -> list[JobDocument | None]:
        return [self.get(job_id) for job_id in job_ids]

    def transition_many(
        self, changes: list[tuple[JobDocument, tuple[str, ...], int | None]]
    ) -> list[tuple[bool, JobDocument | None]]:
        return [self.transition(*change) for change in changes]

    def put_many(self, docs: list[JobDocument]) -> list[None]:
        for doc in docs:
            self.put(doc)
        return [None] * len(docs)

    def wait_finished(self, job_id: str, timeout_s: float) -> None:
        time.sleep(min(max(timeout_s, 0.0), 0.01))

    def ping(self) -> None:
        self._db().execute("SELECT 1")
