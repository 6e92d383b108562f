"""Job records: the status document of every job, in Redis (served) or SQLite (embedded).

Every state change is a compare-and-set on the status, so a cancel racing a worker's start, or a
redelivered job racing its first copy, has one winner. Records expire after the result TTL.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Protocol

import redis

from producer.jobs import JobDocument

_KEY = "pipeq:job:"

# KEYS[1] record; ARGV[1] new status, ARGV[2] new doc, ARGV[3] ttl, ARGV[4..] allowed from-states.
_CAS = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return nil end
for i = 4, #ARGV do
  if status == ARGV[i] then
    redis.call('HSET', KEYS[1], 'status', ARGV[1], 'doc', ARGV[2])
    redis.call('EXPIRE', KEYS[1], ARGV[3])
    return {1, ARGV[2]}
  end
end
return {0, redis.call('HGET', KEYS[1], 'doc')}
"""


# KEYS[1] record; ARGV[1] fingerprint, ARGV[2] status, ARGV[3] doc, ARGV[4] ttl.
# Returns nil when created, else the existing {doc, fingerprint}.
_CREATE = """
if redis.call('HSETNX', KEYS[1], 'fp', ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], 'status', ARGV[2], 'doc', ARGV[3])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  return nil
end
return {redis.call('HGET', KEYS[1], 'doc'), redis.call('HGET', KEYS[1], 'fp')}
"""


class JobRecords(Protocol):
    def create(self, doc: JobDocument, fingerprint: str) -> tuple[JobDocument, str] | None:
        """Store a new record; if the id exists, return the existing (doc, fingerprint)."""

    def create_many(
        self, docs: list[tuple[JobDocument, str]]
    ) -> list[tuple[JobDocument, str] | None]:
        """`create` for many records in one round trip where the store allows it."""

    def delete(self, job_id: str) -> None: ...

    def get(self, job_id: str) -> JobDocument | None: ...

    def transition(
        self, doc: JobDocument, from_statuses: tuple[str, ...]
    ) -> tuple[bool, JobDocument | None]:
        """Replace the record with `doc` if its status is one of `from_statuses`."""

    def put(self, doc: JobDocument) -> None:
        """Write unconditionally (a finished job's result; idempotent by id)."""

    def ping(self) -> None: ...


class RedisRecords:
    def __init__(self, url: str, ttl_s: int) -> None:
        # A worker has one thread per job in flight, all touching records at once: threads wait
        # for a connection rather than fail (redis-py's default pool stops at 100).
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=512,
            timeout=30,
            socket_timeout=10,
            socket_connect_timeout=5,
            health_check_interval=10,
        )
        self._redis = redis.Redis(connection_pool=pool)
        self._ttl_s = ttl_s
        self._cas = self._redis.register_script(_CAS)
        self._create = self._redis.register_script(_CREATE)

    def create(self, doc: JobDocument, fingerprint: str) -> tuple[JobDocument, str] | None:
        return self.create_many([(doc, fingerprint)])[0]

    def create_many(
        self, docs: list[tuple[JobDocument, str]]
    ) -> list[tuple[JobDocument, str] | None]:
        pipe = self._redis.pipeline(transaction=False)
        for doc, fingerprint in docs:
            self._create(
                keys=[_KEY + doc.id],
                args=[fingerprint, doc.status, doc.model_dump_json(), self._ttl_s],
                client=pipe,
            )
        return [
            None if found is None else (JobDocument.model_validate_json(found[0]), found[1].decode())
            for found in pipe.execute()
        ]

    def delete(self, job_id: str) -> None:
        self._redis.delete(_KEY + job_id)

    def get(self, job_id: str) -> JobDocument | None:
        raw = self._redis.hget(_KEY + job_id, "doc")
        return None if raw is None else JobDocument.model_validate_json(raw)

    def transition(
        self, doc: JobDocument, from_statuses: tuple[str, ...]
    ) -> tuple[bool, JobDocument | None]:
        result = self._cas(
            keys=[_KEY + doc.id],
            args=[doc.status, doc.model_dump_json(), self._ttl_s, *from_statuses],
        )
        if result is None:
            return False, None
        changed, raw = result
        return bool(changed), None if raw is None else JobDocument.model_validate_json(raw)

    def put(self, doc: JobDocument) -> None:
        key = _KEY + doc.id
        pipe = self._redis.pipeline()
        pipe.hset(key, mapping={"status": doc.status, "doc": doc.model_dump_json()})
        pipe.expire(key, self._ttl_s)
        pipe.execute()

    def ping(self) -> None:
        self._redis.ping()


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

    def create(self, doc: JobDocument, fingerprint: str) -> tuple[JobDocument, str] | None:
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
        self, docs: list[tuple[JobDocument, str]]
    ) -> list[tuple[JobDocument, str] | None]:
        return [self.create(doc, fingerprint) for doc, fingerprint in docs]

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
        self, doc: JobDocument, from_statuses: tuple[str, ...]
    ) -> tuple[bool, JobDocument | None]:
        marks = ",".join("?" * len(from_statuses))
        cursor = self._db().execute(
            f"UPDATE jobs SET status = ?, doc = ?, expires_at = ? WHERE id = ? AND status IN ({marks})",
            (doc.status, doc.model_dump_json(), time.time() + self._ttl_s, doc.id, *from_statuses),
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

    def ping(self) -> None:
        self._db().execute("SELECT 1")


def open_records(url: str, ttl_s: int) -> JobRecords:
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisRecords(url, ttl_s)
    if url.startswith("sqlite:///"):
        return SqliteRecords(Path(url.removeprefix("sqlite:///")), ttl_s)
    raise ValueError(f"PIPEQ_RESULT_URL must be redis://… or sqlite:///path, got {url!r}")
