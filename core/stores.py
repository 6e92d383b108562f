"""Where a finished job's outputs live: inline in its job record, or in an S3 object beside it.

    ResultStore.save(doc) -> the record as kept      ResultStore.load(record) -> doc with outputs

`InlineStore` keeps the outputs in the job record (Redis or SQLite, with the record's TTL).
`S3Store` writes the whole job document as JSON to `s3://<bucket>/<prefix>/<job id>.json` and
keeps the record small: status, errors, timings and `result_url`. `ResultStores` picks one per
job: S3 when the job asks for it (`"store": "s3"`) or its JSON is over
PIPEQ_S3_RESULT_THRESHOLD_BYTES, provided PIPEQ_S3_BUCKET is set; it reads any record back,
whichever store wrote it. Both write by job id only, so a redelivered job overwrites its own
result and nobody else's. The record is the authority: once its TTL runs out the job is gone
(404), whatever S3 still holds.

No torch here: the producer (`Client.get`, the API) reads results back through this module.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from pipeq.config.errors import JobNotFound, StoreError
from pipeq.config.settings import Settings
from pipeq.core.jobs import JobDocument
from pipeq.core.records import JobRecords

log = logging.getLogger(__name__)

_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "404"})


class ResultStore(Protocol):
    def save(self, doc: JobDocument) -> JobDocument:
        """Store a finished job; return its record as kept in the job records."""

    def load(self, record: JobDocument) -> JobDocument:
        """The record with its outputs read back."""


class InlineStore:
    """Outputs inside the job record itself: the default."""

    def __init__(self, records: JobRecords) -> None:
        self._records = records

    def save(self, doc: JobDocument) -> JobDocument:
        self._records.put(doc)
        return doc

    def load(self, record: JobDocument) -> JobDocument:
        return record


class S3Store:
    """The job document as one S3 object; the record keeps everything but the outputs."""

    def __init__(
        self, records: JobRecords, s3: Any, bucket: str, prefix: str, presign_ttl_s: int
    ) -> None:
        self._records = records
        self._s3 = s3
        self._bucket = bucket
        self._prefix = prefix.strip("/")
        self._presign_ttl_s = presign_ttl_s

    def save(self, doc: JobDocument) -> JobDocument:
        from botocore.exceptions import BotoCoreError, ClientError

        key = f"{self._prefix}/{doc.id}.json" if self._prefix else f"{doc.id}.json"
        uri = f"s3://{self._bucket}/{key}"
        try:
            self._s3.put_object(
                Bucket=self._bucket,
                Key=key,
                Body=doc.model_dump_json().encode(),
                ContentType="application/json",
            )
        except (BotoCoreError, ClientError) as exc:
            raise StoreError(f"could not write {uri}: {exc}") from exc
        record = doc.model_copy(update={"outputs": None, "result_url": uri})
        self._records.put(record)
        return record

    def load(self, record: JobDocument) -> JobDocument:
        from botocore.exceptions import BotoCoreError, ClientError

        uri = record.result_url or ""
        bucket, key = _split_s3_uri(uri)
        try:
            body = self._s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) in _MISSING_CODES:
                raise JobNotFound(f"the result of job {record.id!r} is no longer in {uri}") from exc
            raise StoreError(f"could not read {uri}: {exc}") from exc
        except BotoCoreError as exc:
            raise StoreError(f"could not read {uri}: {exc}") from exc
        stored = JobDocument.model_validate_json(body)
        if stored.id != record.id:
            raise StoreError(f"{uri} holds job {stored.id!r}, not {record.id!r}")
        return record.model_copy(update={"outputs": stored.outputs})

    def presigned_url(self, uri: str) -> str:
        bucket, key = _split_s3_uri(uri)
        url: str = self._s3.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=self._presign_ttl_s
        )
        return url


class ResultStores:
    """The one place that chooses a store for a job and reads any record back."""

    def __init__(self, settings: Settings, records: JobRecords, s3: Any = None) -> None:
        self.inline = InlineStore(records)
        self.s3: S3Store | None = None
        if settings.s3_bucket:
            self.s3 = S3Store(
                records,
                s3 or s3_client(settings),
                settings.s3_bucket,
                settings.s3_prefix,
                settings.s3_presign_ttl_s,
            )
        self._records = records
        self._threshold_bytes = settings.s3_result_threshold_bytes

    def save(self, doc: JobDocument, requested: str) -> JobDocument:
        """Store a finished job where it belongs. If S3 refuses, the job fails with StoreError on
        every input (a stuck `running` record would be worse), and the refusal is logged."""
        store = self._pick(doc, requested)
        try:
            return store.save(doc)
        except StoreError as exc:
            log.error("job %s: %s", doc.id, exc)
            count = len(doc.outputs or [])
            errors = [exc.to_info()] * count
            failed = doc.model_copy(
                update={"status": "failed", "outputs": [None] * count, "errors": errors}
            )
            return self.inline.save(failed)

    def save_many(self, jobs: list[tuple[JobDocument, str]]) -> list[JobDocument]:
        """`save` of each (doc, requested store); the records kept inline are written in one
        round trip."""
        kept: list[JobDocument] = []
        inline: list[JobDocument] = []
        for doc, requested in jobs:
            if self._pick(doc, requested) is self.inline:
                inline.append(doc)
                kept.append(doc)
            else:
                kept.append(self.save(doc, requested))
        self._records.put_many(inline)
        return kept

    def load(self, record: JobDocument, presign: bool = False) -> JobDocument:
        """The record with its outputs, wherever they are; `presign` swaps an `s3://`
        result_url for an https URL anyone holding it can GET until PIPEQ_S3_PRESIGN_TTL_S."""
        if not (record.result_url or "").startswith("s3://"):
            return record
        s3 = self._need_s3(record)
        doc = s3.load(record)
        if presign:
            doc = doc.model_copy(update={"result_url": s3.presigned_url(record.result_url or "")})
        return doc

    def presigned_url(self, uri: str) -> str:
        return self._need_s3(None).presigned_url(uri)

    def _pick(self, doc: JobDocument, requested: str) -> ResultStore:
        if self.s3 is None:
            if requested == "s3":
                log.warning("job %s asks for store=s3, but PIPEQ_S3_BUCKET is unset", doc.id)
            return self.inline
        if requested == "s3" or len(doc.model_dump_json()) > self._threshold_bytes:
            return self.s3
        return self.inline

    def _need_s3(self, record: JobDocument | None) -> S3Store:
        if self.s3 is None:
            where = f"job {record.id!r}'s result is in {record.result_url}" if record else "S3"
            raise StoreError(f"{where}, but PIPEQ_S3_BUCKET is not set in this process")
        return self.s3


def s3_client(settings: Settings) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=5, read_timeout=30, retries={"max_attempts": 3, "mode": "standard"}
    )
    return boto3.client("s3", endpoint_url=settings.s3_endpoint_url, config=config)


def _split_s3_uri(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not uri.startswith("s3://") or not bucket or not key:
        raise StoreError(f"not an s3://bucket/key URI: {uri!r}")
    return bucket, key
