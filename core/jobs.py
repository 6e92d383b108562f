"""The wire contract: what a producer sends, what the queue carries, what a reader gets back.

`JobRequest` is the body of `POST /v1/jobs`; `JobMessage` is the Celery task's one JSON argument;
`JobDocument` is the record `GET /v1/jobs/{id}` returns. All are frozen pydantic models, and a
body that does not validate never reaches the queue.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.json_schema import SkipJsonSchema

from pipeq.config.errors import ErrorInfo
from pipeq.core.inputs import (
    HTTP_URL_PATTERN,
    STRICT,
    DataRef,
    DocumentInput,
    Input,
    UrlRef,
    text_chars,
)

Lane = Literal["interactive", "bulk"]
Status = Literal["queued", "running", "succeeded", "failed", "expired", "cancelled"]
FINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "expired", "cancelled"})

MAX_PARAMS_DEPTH = 16
# A job id, from the body or the Idempotency-Key header: one path segment of its URL.
JOB_ID_PATTERN = r"^[\w.:-]+$"


def _depth(value: Any) -> int:
    """Nesting depth of a JSON value, iterative so a hostile one cannot exhaust the stack."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if level > MAX_PARAMS_DEPTH:
            break
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            stack.extend((child, level + 1) for child in item)
    return deepest


def _json_number(value: Any) -> Any:
    """`value` with each integral float an int. JSON has one number type: 5.0 is the integer 5
    (JSON Schema's "integer" says so too), so an integer param written 5.0 is not refused by
    the strict param lists (config/params.py), and the pipeline gets an int."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _json_number(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_number(item) for item in value]
    return value


def owner_of(api_key: str) -> str:
    """The owner recorded on an API key's jobs: a hash, so no record or log holds the key."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


def scoped_id(owner: str | None, job_id: str) -> str:
    """The stored id of a job: ids are per API key, so two keys may both submit "order-1" (and
    the broker, worker, result store and dead letters keep one name per job without knowing)."""
    return job_id if owner is None else f"{owner}:{job_id}"


WebhookEvent = Literal["succeeded", "failed", "expired", "cancelled"]
DEFAULT_WEBHOOK_EVENTS: tuple[WebhookEvent, ...] = ("succeeded", "failed")


class Webhook(BaseModel):
    model_config = STRICT
    url: str = Field(json_schema_extra={"pattern": HTTP_URL_PATTERN})
    events: list[WebhookEvent] = Field(default_factory=lambda: list(DEFAULT_WEBHOOK_EVENTS))

    @field_validator("url")
    @classmethod
    def _http_only(cls, url: str) -> str:
        return UrlRef._http_only(url)


class JobRequest(BaseModel):
    """The body of `POST /v1/jobs` and the arguments of `Client.submit`."""

    model_config = STRICT

    model: str = Field(min_length=1, max_length=200)
    inputs: list[Input] = Field(min_length=1, max_length=100_000)
    params: dict[str, Any] = Field(default_factory=dict)
    priority: Lane = "interactive"
    id: str | None = Field(default=None, min_length=1, max_length=200, pattern=JOB_ID_PATTERN)
    webhook: Webhook | None = None
    store: Literal["redis", "s3"] = "redis"
    deadline_s: float | None = Field(default=None, gt=0)

    @field_validator("params")
    @classmethod
    def _shallow(cls, params: dict[str, Any]) -> dict[str, Any]:
        # Pipeline call params are a few levels deep at most; a deeply nested body would only
        # fail later, as a 500, when pydantic or json serialises it (depth limits of their own).
        if _depth(params) > MAX_PARAMS_DEPTH:
            raise ValueError(f"params nest deeper than {MAX_PARAMS_DEPTH} levels")
        return {key: _json_number(value) for key, value in params.items()}

    def inline_bytes(self) -> int:
        """Largest decoded inline payload among the inputs."""
        sizes = [0]
        for item in self.inputs:
            ref = item.image if isinstance(item, DocumentInput) else item
            if isinstance(ref, DataRef):
                sizes.append(ref.decoded_size())
        return max(sizes)

    def longest_text(self) -> tuple[int, int]:
        """(characters, index) of the input with the most text (`text_chars`)."""
        return max((text_chars(item), index) for index, item in enumerate(self.inputs))

    def fingerprint(self) -> str:
        """Stable hash of the body, so a repeated id can be told from a conflicting one."""
        body = self.model_dump(mode="json", exclude={"id"})
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def to_message(self, job_id: str | None = None, owner: str | None = None) -> JobMessage:
        return JobMessage(
            id=scoped_id(owner, job_id or self.id or uuid.uuid4().hex),
            owner=owner,
            model=self.model,
            inputs=self.inputs,
            params=self.params,
            lane=self.priority,
            webhook=self.webhook,
            store=self.store,
            submitted_at=time.time(),
            deadline_s=self.deadline_s,
        )


class JobMessage(BaseModel):
    """The one argument of the `pipeq.run` Celery task, as JSON."""

    model_config = STRICT

    id: str
    model: str
    inputs: list[Input]
    params: dict[str, Any]
    lane: Lane
    webhook: Webhook | None = None
    store: Literal["redis", "s3"] = "redis"
    submitted_at: float
    deadline_s: float | None = None
    # Left out while unset, so a message without an owner is what workers always read.
    owner: str | None = Field(default=None, exclude_if=lambda owner: owner is None)


class JobProgress(BaseModel):
    """Forward parts done of those prepared so far (one per input, one per chunk of chunked
    audio); `total` grows while a job's inputs are still being prepared."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    done: int = Field(ge=0)
    total: int = Field(ge=0)


class JobDocument(BaseModel):
    """A job's record: `GET /v1/jobs/{id}`, `Client.get`, the webhook body."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    model: str
    status: Status
    lane: Lane = "interactive"
    outputs: list[Any] | None = None
    errors: list[ErrorInfo | None] | None = None
    result_url: str | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    worker: str | None = None
    webhook: Webhook | None = None
    cached: bool | None = Field(
        default=None, description="True when every output came from the model's result cache."
    )
    progress: JobProgress | None = Field(
        default=None, description="Parts forwarded so far; updated every ~0.5 s while running."
    )
    deliveries: int | None = Field(
        default=None,
        ge=0,
        description="How many times a worker took this job; one past PIPEQ_MAX_DELIVERIES, it "
        "fails as PoisonJob instead of running again.",
    )

    # Internal: kept on the record, left out of every dump while unset (so a job without an owner
    # has the document it always had) and out of the OpenAPI schema (the API never returns it).
    owner: SkipJsonSchema[str | None] = Field(default=None, exclude_if=lambda owner: owner is None)

    @property
    def done(self) -> bool:
        return self.status in FINAL_STATUSES

    @property
    def public_id(self) -> str:
        """The id its owner submitted and sees (the stored id without the owner's prefix)."""
        return self.id.removeprefix(f"{self.owner}:") if self.owner else self.id

    def public(self) -> JobDocument:
        """The document as its owner sees it: its own id, no owner."""
        return self.model_copy(update={"id": self.public_id, "owner": None})


class JobAccepted(BaseModel):
    """The answer to `POST /v1/jobs`."""

    id: str
    status: Status
