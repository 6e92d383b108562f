"""`Client`: submit jobs to the queue and read their records. No torch, no worker code."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from pipeq.config.errors import (
    InvalidInput,
    JobConflict,
    JobNotFound,
    PayloadTooLarge,
    UnknownModel,
)
from pipeq.config.params import check_params
from pipeq.config.registry import ModelSpec, Registry, load_registry
from pipeq.config.settings import Settings
from pipeq.core.input_kinds import kind_error
from pipeq.core.inputs import Input
from pipeq.core.jobs import JobDocument, JobMessage, JobRequest, Lane, Webhook, scoped_id
from pipeq.core.ledger import admit, open_ledger
from pipeq.core.publish import send_jobs
from pipeq.core.records import JobRecords, open_records
from pipeq.core.stores import ResultStores
from pipeq.core.webhook_urls import refused_webhook
from pipeq.core.webhooks import publish_for

if TYPE_CHECKING:
    from celery import Celery
    from celery.canvas import Signature


class Client:
    """Publishes jobs (JSON) to the broker and reads their records from the result store."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        registry: Registry | None = None,
        celery: Celery | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self.registry = registry or load_registry(self.settings.models)
        self._celery = celery
        self.records: JobRecords = open_records(
            self.settings.effective_result_url, self.settings.result_ttl_s
        )
        self.results = ResultStores(self.settings, self.records)
        self.ledger = open_ledger(self.settings)

    @property
    def celery(self) -> Celery:
        """The Celery app, made on first use: Celery and kombu take longer to import than the
        rest of the client, and a backend that only reads results never needs them."""
        if self._celery is None:
            from pipeq.config.celery import make_celery

            self._celery = make_celery(self.settings)
        return self._celery

    def submit(
        self,
        model: str,
        inputs: list[Input],
        params: dict[str, Any] | None = None,
        *,
        priority: Lane = "interactive",
        id: str | None = None,
        webhook: Webhook | dict[str, Any] | None = None,
        store: str = "redis",
        deadline_s: float | None = None,
        link: Signature | None = None,
        link_error: Signature | None = None,
    ) -> str:
        """Queue one job and return its id. `link` (`link_error`) is a Celery signature of the
        producer's own, applied to the job document (JSON) when the job succeeds (fails or
        expires); neither runs for a cancelled job."""
        request = JobRequest.model_validate(
            {
                "model": model,
                "inputs": inputs,
                "params": params or {},
                "priority": priority,
                "id": id,
                "webhook": webhook,
                "store": store,
                "deadline_s": deadline_s,
            }
        )
        [(doc, _)] = self.submit_many([request], link=link, link_error=link_error)
        return doc.id

    def submit_request(
        self, request: JobRequest, owner: str | None = None
    ) -> tuple[JobDocument, bool]:
        """Queue `request`; returns (record, created). A repeated id with the same body returns
        the existing record and queues nothing; with another body it raises JobConflict. With an
        `owner` (the API key's hash, `owner_of`) the id is that owner's own (`scoped_id`)."""
        return self.submit_many([request], owner=owner)[0]

    def submit_many(
        self,
        requests: list[JobRequest],
        *,
        owner: str | None = None,
        link: Signature | None = None,
        link_error: Signature | None = None,
    ) -> list[tuple[JobDocument, bool]]:
        """Queue many jobs with one round trip for their records and one pipelined publish.
        Raises Overloaded (nothing queued) when a model's lane cannot take them now."""
        for request in requests:
            self._admit(request)
        messages = [self._message(request, owner) for request in requests]
        self._admit_load(messages)
        queued = [
            JobDocument(
                id=m.id,
                model=m.model,
                status="queued",
                lane=m.lane,
                timings={"submitted_at": m.submitted_at},
                webhook=m.webhook,
                owner=m.owner,
            )
            for m in messages
        ]
        fingerprints = [request.fingerprint() for request in requests]
        # json.dumps escapes what UTF-8 cannot hold (a lone surrogate in a text), as kombu does.
        bodies = [json.dumps(message.model_dump(mode="json")) for message in messages]
        existing = self.records.create_many(list(zip(queued, fingerprints, bodies, strict=True)))
        results: list[tuple[JobDocument, bool]] = []
        fresh: list[JobMessage] = []
        conflicts: list[str] = []
        for message, doc, fingerprint, found in zip(
            messages, queued, fingerprints, existing, strict=True
        ):
            if found is None:
                fresh.append(message)
                results.append((doc, True))
            else:
                if found[1] != fingerprint:
                    conflicts.append(doc.public_id)
                results.append((found[0], False))
        self._publish_counted(fresh, link=link, link_error=link_error)
        if conflicts:
            raise JobConflict(f"job(s) {', '.join(conflicts)} exist with a different body")
        return results

    def _admit(self, request: JobRequest) -> None:
        spec = self.registry.get(request.model)
        if spec is None:
            raise UnknownModel(
                f"unknown model {request.model!r}; this service has {', '.join(self.registry.models)}"
            )
        check_params(spec.task, request.params, spec.params)
        self._check_inputs(request, spec)
        if request.inline_bytes() > self.settings.max_media_bytes:
            raise PayloadTooLarge(
                f"inline data of {request.inline_bytes()} bytes is over PIPEQ_MAX_MEDIA_BYTES "
                f"({self.settings.max_media_bytes}); send a url or s3 reference instead"
            )
        chars, index = request.longest_text()
        if chars > self.settings.max_text_chars:
            raise PayloadTooLarge(
                f"input {index} holds {chars} characters of text, over PIPEQ_MAX_TEXT_CHARS "
                f"({self.settings.max_text_chars}); split it into several inputs"
            )

    def _check_inputs(self, request: JobRequest, spec: ModelSpec) -> None:
        """Inputs the model's task cannot take, and a webhook the SSRF rule refuses, are a 422
        before anything is queued: each bad input named by its index."""
        bad = [
            f"inputs[{index}] {why}"
            for index, item in enumerate(request.inputs)
            if (why := kind_error(item, spec.name, spec.task, spec.modality))
        ]
        if bad:
            more = f"; and {len(bad) - 10} more" if len(bad) > 10 else ""
            raise InvalidInput("; ".join(bad[:10]) + more)
        if request.webhook is not None and not self.settings.allow_private_urls:
            why = refused_webhook(request.webhook.url)
            if why is not None:
                raise InvalidInput(f"webhook.url: {why}")

    def _message(self, request: JobRequest, owner: str | None) -> JobMessage:
        message = request.to_message(owner=owner)
        if message.deadline_s is None:
            default = self.settings.default_deadline_s(message.lane)
            message = message.model_copy(update={"deadline_s": default})
        return message

    def _admit_load(self, messages: list[JobMessage]) -> None:
        if self.ledger is None:
            return
        if self.settings.max_backlog is None and all(m.deadline_s is None for m in messages):
            return
        admit(
            self.ledger,
            self.settings,
            [(m.model, m.lane, len(m.inputs), m.deadline_s) for m in messages],
        )

    def _publish_counted(
        self,
        messages: list[JobMessage],
        *,
        link: Signature | None = None,
        link_error: Signature | None = None,
    ) -> None:
        """`publish`, with the inputs counted into the ledger's backlog first (a worker may
        claim a job before this call returns) and taken back if the publish fails."""
        counts: dict[tuple[str, str], int] = {}
        for message in messages:
            key = (message.model, message.lane)
            counts[key] = counts.get(key, 0) + len(message.inputs)
        if self.ledger is not None and counts:
            self.ledger.add(counts)
        try:
            self.publish(messages, link=link, link_error=link_error)
        except Exception:
            if self.ledger is not None and counts:
                self.ledger.add(counts, sign=-1)
            raise

    def publish(
        self,
        messages: list[JobMessage],
        *,
        link: Signature | None = None,
        link_error: Signature | None = None,
    ) -> None:
        """Publish in one pipelined batch. If the broker refuses, the records of these jobs are
        removed, so a retry with the same ids queues them again."""
        try:
            self.send(messages, link=link, link_error=link_error)
        except Exception:
            for message in messages:
                self.records.delete(message.id)
            raise

    def send(
        self,
        messages: list[JobMessage],
        *,
        link: Signature | None = None,
        link_error: Signature | None = None,
    ) -> None:
        """Put `messages` on their queues in one pipelined batch (kombu's Producer.batch)."""
        send_jobs(self.celery, messages, link=link, link_error=link_error)

    def get(self, job_id: str, presign: bool = False, owner: str | None = None) -> JobDocument:
        """The job's record, with its outputs read back from S3 where they were stored there;
        `presign` swaps such a job's `s3://` result_url for a presigned https URL. With an
        `owner`, `job_id` is that owner's id, and another owner's job is not found."""
        doc = self.records.get(scoped_id(owner, job_id))
        if doc is None or (owner is not None and doc.owner != owner):
            raise JobNotFound(f"no job {job_id!r} (never submitted, or its result expired)")
        return self.results.load(doc, presign)

    def wait(self, job_id: str, timeout_s: float = 60.0) -> JobDocument:
        """Block until the job is finished or `timeout_s` passes; return the latest record."""
        deadline = time.monotonic() + timeout_s
        while True:
            doc = self.get(job_id)
            remaining_s = deadline - time.monotonic()
            if doc.done or remaining_s <= 0:
                return doc
            self.records.wait_finished(job_id, remaining_s)

    def cancel(self, job_id: str, owner: str | None = None) -> tuple[JobDocument, bool]:
        """Cancel a job that has not started. Returns (record, cancelled)."""
        doc = self.get(job_id, owner=owner)
        changed, current = self.records.transition(
            doc.model_copy(update={"status": "cancelled"}), ("queued",)
        )
        if current is None:
            raise JobNotFound(f"no job {job_id!r}")
        if changed:
            publish_for(self.celery, current)
        return current, changed
