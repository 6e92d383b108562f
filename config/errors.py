"""pipeq's exceptions: one tree, each class one cause.

    PipeqError
    ├── ConfigError               settings or models.yaml are invalid (start-up)
    ├── JobError                  a job as a whole cannot be accepted or found (HTTP status)
    │   ├── Unauthorized          the API key is missing or wrong                          (401)
    │   ├── InvalidRequest        not JSON, or not of the job schema                       (422)
    │   ├── InvalidInput          an input its model's task cannot take; an unsafe webhook (422)
    │   ├── UnknownModel          the job names a model the registry does not hold         (404)
    │   ├── JobNotFound           no job with this id (never existed, or its TTL ran out)  (404)
    │   ├── JobConflict           the id exists with another body, or the job cannot change state
    │   │                                                                                  (409)
    │   ├── PayloadTooLarge       inline data, a text or a request body over its cap       (413)
    │   ├── InvalidParams         a call param outside the task's allow-list (config/params.py)
    │   │                                                                                  (422)
    │   └── Overloaded            the model's lane is over PIPEQ_MAX_BACKLOG or too slow for the
    │                             deadline                                                 (429)
    ├── InputError                one input failed; the job's other inputs go on
    │   ├── MediaError            a media reference could not be read
    │   │   ├── MediaNotFound     missing file, 404, no such S3 key
    │   │   ├── MediaTooLarge     over PIPEQ_MAX_MEDIA_BYTES
    │   │   ├── MediaTimeout      the remote end was too slow
    │   │   ├── UnsafeReference   private address, path outside PIPEQ_MEDIA_ROOTS, bad scheme
    │   │   └── FetchFailed       any other transport failure (5xx after retries, TLS, DNS)
    │   │       └── UnsupportedEncoding  a Content-Encoding not decoded under the cap (stacked)
    │   ├── TextTooLong           a text input or document question over PIPEQ_MAX_TEXT_CHARS
    │   ├── DecodeError           bytes that are not the media the model's task needs
    │   ├── ModelError            the pipeline raised on this input
    │   ├── OcrTimeout            Tesseract ran past PIPEQ_OCR_TIMEOUT_S on this document
    │   ├── OutOfMemory           preparing the input passed the worker's memory bound
    │   ├── PoisonJob             the job's workers died on each of its PIPEQ_MAX_DELIVERIES runs
    │   └── Expired               the input was not started before the job's deadline
    ├── StoreError                a result could not be written to or read back from S3; the
    │                             broker or record store unreachable                      (503)
    ├── ServiceUnavailable        the API cannot be reached (HttpClient)                   (503)
    └── WebhookError              webhooks: delivery set-up or verification
        └── InvalidSignature      a received webhook is unsigned, forged, tampered with or stale

Per-input errors cross the wire as JSON (`ErrorInfo`: type, message, retryable), never pickled;
so does every error response of the HTTP API, as `{"error": ErrorInfo}` with the class's
`http_status` (500 for the others).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ErrorInfo(BaseModel):
    """A per-input error as stored in the job document."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    message: str
    retryable: bool = False


class PipeqError(Exception):
    """Root of every error pipeq raises on purpose. `http_status` is what the HTTP API answers
    for it, `retry_after_s` (where set) its Retry-After."""

    retryable = False
    http_status = 500
    retry_after_s: float | None = None

    def to_info(self) -> ErrorInfo:
        return ErrorInfo(type=type(self).__name__, message=str(self), retryable=self.retryable)


class ConfigError(PipeqError):
    """Settings or the model registry are invalid."""


class JobError(PipeqError):
    """A job as a whole cannot be accepted or found."""


class Unauthorized(JobError):
    """The API key is missing or wrong."""

    http_status = 401


class InvalidRequest(JobError):
    """The request is malformed: not JSON, or not of the job schema."""

    http_status = 422


class InvalidInput(JobError):
    """An input the model's task cannot take (text sent to an image model), or a webhook URL
    the SSRF rule refuses: refused at submit, nothing queued."""

    http_status = 422


class UnknownModel(JobError):
    """The job names a model the registry does not hold."""

    http_status = 404


class JobNotFound(JobError):
    """No job with this id."""

    http_status = 404


class JobConflict(JobError):
    """The id is taken by another body, or the job is past the state the call needs."""

    http_status = 409


class PayloadTooLarge(JobError):
    """Inline data over PIPEQ_MAX_MEDIA_BYTES, a text over PIPEQ_MAX_TEXT_CHARS, or a request
    body over PIPEQ_MAX_REQUEST_BYTES."""

    http_status = 413


class InvalidParams(JobError):
    """A call param the task does not accept, of the wrong type, or out of its range."""

    http_status = 422


class Overloaded(JobError):
    """The model's lane holds too much work to take this job now; retry after `retry_after_s`."""

    retryable = True
    http_status = 429
    retry_after_s: float

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class InputError(PipeqError):
    """One input failed; the other inputs of its job are unaffected."""


class MediaError(InputError):
    """A media reference could not be read."""


class MediaNotFound(MediaError):
    """The file, URL or S3 key does not exist."""


class MediaTooLarge(MediaError):
    """The media is larger than PIPEQ_MAX_MEDIA_BYTES."""


class MediaTimeout(MediaError):
    """The remote end did not answer in time."""

    retryable = True


class UnsafeReference(MediaError):
    """The reference points where pipeq may not read (private address, outside media roots)."""


class FetchFailed(MediaError):
    """Any other transport failure."""

    retryable = True


class UnsupportedEncoding(FetchFailed):
    """The server sent a Content-Encoding that pipeq does not decode in bounded steps: stacked
    layers, or one other than gzip and deflate (pipeq asks for identity)."""

    retryable = False


class TextTooLong(InputError):
    """A text input, or a document's question and words, longer than PIPEQ_MAX_TEXT_CHARS."""


class DecodeError(InputError):
    """The bytes are not media the model's task can use."""


class ModelError(InputError):
    """The pipeline raised on this input."""


class OcrTimeout(InputError):
    """Tesseract did not finish this document within PIPEQ_OCR_TIMEOUT_S."""


class OutOfMemory(InputError):
    """Preparing this input needed more memory than PIPEQ_WORKER_MEMORY_HEADROOM_MB leaves."""


class PoisonJob(InputError):
    """The job was delivered PIPEQ_MAX_DELIVERIES times and its worker died each time."""


class Expired(InputError):
    """The input was not started before the job's deadline."""


class StoreError(PipeqError):
    """A result could not be written to, or read back from, its store (S3); for the API, the
    broker or the result store is unreachable."""

    retryable = True
    http_status = 503
    retry_after_s = 5


class ServiceUnavailable(PipeqError):
    """The API cannot be reached, or answered 5xx past the client's retry budget."""

    retryable = True
    http_status = 503


class WebhookError(PipeqError):
    """Webhook delivery could not be set up, or a received webhook could not be verified."""


class InvalidSignature(WebhookError):
    """A received webhook is unsigned, forged, tampered with, or outside the timestamp tolerance."""
