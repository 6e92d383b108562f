"""Job records: the status document of every job, in Redis (served) or SQLite (embedded).

Every state change is a compare-and-set on the status (a worker's claim also on the delivery
count), so a cancel racing a worker's start, or a redelivered job racing its first copy, has one
winner. Records expire after the result TTL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, cast

import redis
from redis.exceptions import NoScriptError

from pipeq.core.combine import Combiner
from pipeq.core.jobs import JobDocument
from pipeq.core.sqlite_records import SqliteRecords

RECORD_KEY = "pipeq:job:"
DONE_KEY = "pipeq:done:"
DONE_TTL_S = 60

# KEYS[1] record, KEYS[2] its lane's pending set; ARGV[1] new status, ARGV[2] new doc, ARGV[3] ttl,
# ARGV[4] job id, ARGV[5] the deliveries the record must hold ('' = any), ARGV[6..] allowed
# from-states. Leaving `queued` drops the job from the pending set and its kept message.
_CAS = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return nil end
if ARGV[5] ~= '' then
  local held = cjson.decode(redis.call('HGET', KEYS[1], 'doc')).deliveries
  if type(held) ~= 'number' then held = 0 end
  if held ~= tonumber(ARGV[5]) then return {0, redis.call('HGET', KEYS[1], 'doc')} end
end
for i = 6, #ARGV do
  if status == ARGV[i] then
    redis.call('HSET', KEYS[1], 'status', ARGV[1], 'doc', ARGV[2])
    redis.call('EXPIRE', KEYS[1], ARGV[3])
    if ARGV[1] ~= 'queued' then
      redis.call('ZREM', KEYS[2], ARGV[4])
      redis.call('HDEL', KEYS[1], 'msg')
    end
    return {1, ARGV[2]}
  end
end
return {0, redis.call('HGET', KEYS[1], 'doc')}
"""

# KEYS[1] record, KEYS[2] its lane's pending set; ARGV[1] fingerprint, ARGV[2] status, ARGV[3] doc,
# ARGV[4] ttl, ARGV[5] the queued message, ARGV[6] submitted at, ARGV[7] job id.
# Returns nil when created, else the existing {doc, fingerprint}.
_CREATE = """
if redis.call('HSETNX', KEYS[1], 'fp', ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], 'status', ARGV[2], 'doc', ARGV[3], 'msg', ARGV[5])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  redis.call('ZADD', KEYS[2], ARGV[6], ARGV[7])
  return nil
end
return {redis.call('HGET', KEYS[1], 'doc'), redis.call('HGET', KEYS[1], 'fp')}
"""


def pending_key(model: str, lane: str) -> str:
    """Jobs of a lane still `queued`, scored by when they were (last) published."""
    return f"pipeq:pending:{model}:{lane}"


class JobRecords(Protocol):
    def create_many(
        self, entries: list[tuple[JobDocument, str, str]]
    ) -> list[tuple[JobDocument, str] | None]:
        """Store new records (doc, fingerprint, the message as published), one round trip where
        the store allows it; for an id that exists, return the existing (doc, fingerprint)."""

    def delete(self, job_id: str) -> None: ...

    def get(self, job_id: str) -> JobDocument | None: ...

    def transition(
        self, doc: JobDocument, from_statuses: tuple[str, ...], deliveries: int | None = None
    ) -> tuple[bool, JobDocument | None]:
        """Replace the record with `doc` if its status is one of `from_statuses` and, when
        `deliveries` is given, the record's delivery count (None reads as 0) is that."""

    def put(self, doc: JobDocument) -> None:
        """Write unconditionally (a finished job's result; idempotent by id)."""

    def get_many(self, job_ids: list[str]) -> list[JobDocument | None]:
        """`get` of each id, one round trip where the store allows it."""

    def transition_many(
        self, changes: list[tuple[JobDocument, tuple[str, ...], int | None]]
    ) -> list[tuple[bool, JobDocument | None]]:
        """`transition` of each (doc, from_statuses, deliveries), one round trip where the store
        allows it."""

    def put_many(self, docs: list[JobDocument]) -> list[None]:
        """`put` of each doc, one round trip where the store allows it."""

    def wait_finished(self, job_id: str, timeout_s: float) -> None:
        """Return when the job may have finished, or after `timeout_s`: callers re-read."""

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
        # Concurrent calls share round trips (core/combine.py): a worker's job threads
        # read, claim and store their records at the same moments.
        self._gets = Combiner(self.get_many)
        self._transitions = Combiner(self.transition_many)
        self._puts = Combiner(self.put_many)

    def create_many(
        self, entries: list[tuple[JobDocument, str, str]]
    ) -> list[tuple[JobDocument, str] | None]:
        pipe = self._redis.pipeline(transaction=False)
        for doc, fingerprint, message in entries:
            self._create(
                keys=[RECORD_KEY + doc.id, pending_key(doc.model, doc.lane)],
                args=[
                    fingerprint,
                    doc.status,
                    doc.model_dump_json(),
                    self._ttl_s,
                    message,
                    doc.timings.get("submitted_at", 0.0),
                    doc.id,
                ],
                client=pipe,
            )
        return [
            None
            if found is None
            else (JobDocument.model_validate_json(found[0]), found[1].decode())
            for found in pipe.execute()
        ]

    def stale_pending(self, model: str, lane: str, before: float, limit: int) -> list[str]:
        """Ids of jobs still queued that were last published before `before`."""
        ids = cast(
            list[bytes],
            self._redis.zrangebyscore(pending_key(model, lane), "-inf", before, start=0, num=limit),
        )
        return [job_id.decode() for job_id in ids]

    def seen_stale_before(
        self, model: str, lane: str, job_ids: list[str], now: float, grace_s: float
    ) -> list[str]:
        """Of `job_ids`, stale on an empty queue now, those already seen so at least `grace_s`
        ago; the others are noted as seen now. A message a live worker has taken off the queue
        but not yet claimed is seen once at most: its job is running by the next sighting."""
        key = f"pipeq:stale:{model}:{lane}"
        pipe = self._redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.zscore(key, job_id)
        seen = dict(zip(job_ids, pipe.execute(), strict=True))
        due = [job_id for job_id, at in seen.items() if at is not None and at <= now - grace_s]
        pipe = self._redis.pipeline(transaction=False)
        # Sightings of jobs claimed since (or published again) are forgotten after a while.
        pipe.zremrangebyscore(key, "-inf", now - 4 * grace_s)
        first = {job_id: now for job_id, at in seen.items() if at is None}
        if first:
            pipe.zadd(key, first)
        if due:
            pipe.zrem(key, *due)
        pipe.execute()
        return due

    def republishable(self, model: str, lane: str, job_ids: list[str], now: float) -> list[str]:
        """The kept messages of those of `job_ids` still queued (re-stamped as published `now`);
        ids with no queued record leave the pending set."""
        pipe = self._redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(RECORD_KEY + job_id, "status", "msg")
        messages, gone = [], []
        for job_id, (status, message) in zip(job_ids, pipe.execute(), strict=True):
            if status == b"queued" and message:
                messages.append(message.decode())
            else:
                gone.append(job_id)
        pipe = self._redis.pipeline(transaction=False)
        if gone:
            pipe.zrem(pending_key(model, lane), *gone)
        keep = [job_id for job_id in job_ids if job_id not in set(gone)]
        if keep:
            pipe.zadd(pending_key(model, lane), dict.fromkeys(keep, now))
        pipe.execute()
        return messages

    def delete(self, job_id: str) -> None:
        self._redis.delete(RECORD_KEY + job_id)

    def get(self, job_id: str) -> JobDocument | None:
        return self._gets(job_id)

    def get_many(self, job_ids: list[str]) -> list[JobDocument | None]:
        pipe = self._redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(RECORD_KEY + job_id, "doc")
        return [
            None if raw is None else JobDocument.model_validate_json(raw) for raw in pipe.execute()
        ]

    def transition(
        self, doc: JobDocument, from_statuses: tuple[str, ...], deliveries: int | None = None
    ) -> tuple[bool, JobDocument | None]:
        return self._transitions((doc, from_statuses, deliveries))

    def transition_many(
        self, changes: list[tuple[JobDocument, tuple[str, ...], int | None]]
    ) -> list[tuple[bool, JobDocument | None]]:
        calls = []
        for doc, from_statuses, deliveries in changes:
            held = "" if deliveries is None else deliveries
            keys = [RECORD_KEY + doc.id, pending_key(doc.model, doc.lane)]
            args = [doc.status, doc.model_dump_json(), self._ttl_s, doc.id, held, *from_statuses]
            calls.append((keys, args))
        answers: list[tuple[bool, JobDocument | None]] = []
        finished = self._redis.pipeline()
        for (doc, _, _), result in zip(changes, self._run_cas(calls), strict=True):
            if result is None:
                answers.append((False, None))
                continue
            changed, raw = result
            if changed and doc.done:
                self._signal_finished(finished, doc.id)
            answers.append(
                (bool(changed), None if raw is None else JobDocument.model_validate_json(raw))
            )
        if len(finished):
            finished.execute()
        return answers

    def _run_cas(self, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """The CAS script over `calls` in one round trip. By its hash: a redis-py pipeline that
        holds a `Script` asks SCRIPT EXISTS first, a second round trip per batch. A server that
        lost its scripts (restarted) refuses every call of the batch, and it runs again."""
        try:
            answers: list[Any] = self._cas_pipeline(calls).execute()
        except NoScriptError:
            self._cas.sha = self._redis.script_load(_CAS)
            answers = self._cas_pipeline(calls).execute()
        return answers

    def _cas_pipeline(self, calls: list[tuple[list[str], list[Any]]]) -> Any:
        pipe = self._redis.pipeline(transaction=False)
        for keys, args in calls:
            pipe.evalsha(self._cas.sha, len(keys), *keys, *args)
        return pipe

    def put(self, doc: JobDocument) -> None:
        self._puts(doc)

    def put_many(self, docs: list[JobDocument]) -> list[None]:
        pipe = self._redis.pipeline()
        for doc in docs:
            key = RECORD_KEY + doc.id
            pipe.hset(key, mapping={"status": doc.status, "doc": doc.model_dump_json()})
            pipe.expire(key, self._ttl_s)
            if doc.done:
                self._signal_finished(pipe, doc.id)
        pipe.execute()
        return [None] * len(docs)

    @staticmethod
    def _signal_finished(pipe: Any, job_id: str) -> None:
        # One token in a list that expires: a waiter's BLPOP wakes at once, and it puts the
        # token back for the next (wait_finished). Polling would cost each waiter its interval.
        pipe.lpush(DONE_KEY + job_id, 1)
        pipe.expire(DONE_KEY + job_id, DONE_TTL_S)

    def wait_finished(self, job_id: str, timeout_s: float) -> None:
        # Under the connection's socket timeout (10 s); callers loop until their deadline.
        seconds = min(timeout_s, 5.0)
        if seconds <= 0:
            return
        if self._redis.blpop([DONE_KEY + job_id], timeout=seconds) is not None:
            pipe = self._redis.pipeline()
            self._signal_finished(pipe, job_id)
            pipe.execute()

    def ping(self) -> None:
        self._redis.ping()


def open_records(url: str, ttl_s: int) -> JobRecords:
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisRecords(url, ttl_s)
    if url.startswith("sqlite:///"):
        return SqliteRecords(Path(url.removeprefix("sqlite:///")), ttl_s)
    raise ValueError(f"PIPEQ_RESULT_URL must be redis://… or sqlite:///path, got {url!r}")
