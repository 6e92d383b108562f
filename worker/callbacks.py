"""After a job: its webhook and its Celery links; and webhook delivery, in its own worker.

The GPU worker only publishes: when its job engine (worker/engine.py) finishes a job it sends one
`pipeq.webhook` message to the `pipeq.webhooks` queue (about a millisecond) and applies the
producer's `link` / `link_error` to the job document. Sending happens in `pipeq webhooks worker`, a
separate process with no models, so a slow or dead receiver never holds a GPU worker's thread.

Each attempt signs the body afresh per Standard Webhooks (the `webhook-id` stays
`<job id>.<event>`; the timestamp is the attempt's), refuses non-public addresses exactly as
media fetching does (core/urlguard.py: it connects only to the address it checked; no
redirects), ends within PIPEQ_WEBHOOK_TIMEOUT_S however slowly the receiver answers, and
retries timeouts, connection errors, 429 and 5xx with exponential backoff and jitter until
PIPEQ_WEBHOOK_RETRY_SPAN_S has passed since the first attempt. Then, or at once on any other
answer (3xx, 4xx, an unsafe address), the delivery becomes a dead letter.

Backoff is capped at half the visibility timeout: a Celery retry is an ETA message the worker
holds unacked, and Redis hands an unacked message to another consumer once it is older than the
visibility timeout (research/celery.md section 2), which would send the webhook twice.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from standardwebhooks.webhooks import Webhook

from pipeq.config.errors import FetchFailed, UnsafeReference
from pipeq.config.settings import Settings
from pipeq.core.jobs import FINAL_STATUSES, JobDocument, owner_of
from pipeq.core.records import JobRecords
from pipeq.core.stores import ResultStores
from pipeq.core.urlguard import checked_url, deadline
from pipeq.core.webhooks import WebhookDelivery

log = logging.getLogger(__name__)

_MAX_DOUBLINGS = 30  # 2**30 first steps is far past any cap; keeps the float finite


# --- the GPU worker's side -------------------------------------------------------------------


def finished_earlier(records: JobRecords, message: dict[str, Any]) -> JobDocument | None:
    """The record of a redelivered job that a first copy already finished (its worker died
    before the ack, so its webhook and links may not have gone out: they go again)."""
    job_id = message.get("id") if isinstance(message, dict) else None
    record = records.get(job_id) if isinstance(job_id, str) else None
    if record is None or record.status not in FINAL_STATUSES or record.status == "cancelled":
        return None
    return record


# --- the webhooks worker ---------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    reason: str
    retryable: bool


class WebhookSender:
    """One signed POST per call; says whether and how it failed."""

    def __init__(self, settings: Settings, http: httpx.Client, stores: ResultStores) -> None:
        self._signer = Webhook(settings.webhook_secret or "")
        self._own_signers = {
            owner_of(key): Webhook(secret)
            for key, secret in settings.api_key_secrets.items()
            if secret is not None
        }
        self._allow_private = settings.allow_private_urls
        self._timeout_s = settings.webhook_timeout_s
        self._http = http
        self._stores = stores

    def send(self, delivery: WebhookDelivery) -> Failure | None:
        signer, webhook_id, content = self._signed_as(delivery)
        body = json.dumps(content, separators=(",", ":"))
        now = datetime.now(tz=UTC)
        headers = {
            "webhook-id": webhook_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": signer.sign(webhook_id, now, body),
            "content-type": "application/json",
        }
        try:
            url = checked_url(httpx.URL(delivery.url), self._allow_private)
            # The whole attempt, not each socket operation: a receiver that sends one header
            # line now and then would otherwise hold this thread without end.
            with (
                deadline(self._timeout_s),
                self._http.stream("POST", url, content=body.encode(), headers=headers) as response,
            ):
                status = response.status_code
        except UnsafeReference as exc:
            return Failure(str(exc), retryable=False)
        except FetchFailed as exc:  # DNS: the name may resolve again
            return Failure(str(exc), retryable=True)
        except httpx.TimeoutException as exc:
            return Failure(f"no answer in time: {type(exc).__name__}", retryable=True)
        except httpx.TransportError as exc:
            return Failure(f"{type(exc).__name__}: {exc}", retryable=True)
        except httpx.InvalidURL as exc:
            return Failure(f"not a valid URL: {exc}", retryable=False)
        if 200 <= status < 300:
            return None
        return Failure(f"HTTP {status}", retryable=status == 429 or status >= 500)

    def _signed_as(self, delivery: WebhookDelivery) -> tuple[Webhook, str, dict[str, Any]]:
        """The signer, webhook-id and body of a delivery: its owner's own secret and the id the
        owner submitted where the owner's key has a secret, else the shared secret and the
        stored id (which names the owner: core/webhooks.py)."""
        body = self._body(delivery)
        own = self._own_signers.get(delivery.owner) if delivery.owner else None
        if own is None:
            return self._signer, delivery.id, body
        public = str(body["id"]).removeprefix(f"{delivery.owner}:")
        return own, f"{public}.{delivery.event}", {**body, "id": public}

    def _body(self, delivery: WebhookDelivery) -> dict[str, Any]:
        # An S3-stored result is not inlined (it is large by definition): the receiver gets a
        # presigned result_url, signed per attempt so it is fresh however late the attempt.
        result_url = delivery.body.get("result_url")
        if isinstance(result_url, str) and result_url.startswith("s3://"):
            return {**delivery.body, "result_url": self._stores.presigned_url(result_url)}
        return delivery.body


def backoff_s(retries: int, first_s: float, cap_s: float) -> float:
    """Exponential, with "equal jitter": half of each step fixed, half random, so retries of many
    deliveries to one receiver spread out but none comes back at once."""
    step = min(cap_s, first_s * 2.0 ** min(retries, _MAX_DOUBLINGS))
    return step / 2 + random.uniform(0, step / 2)
