"""The one settings object, read from `PIPEQ_*` environment variables once at start-up."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any

from platformdirs import user_data_dir
from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from pipeq.config.errors import ConfigError


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Everything pipeq reads from its environment, validated once at start-up."""

    model_config = SettingsConfigDict(env_prefix="PIPEQ_", extra="forbid", frozen=True)

    broker_url: str | None = Field(
        default=None, description="Celery broker; unset = embedded filesystem broker in data_dir."
    )
    result_url: str | None = Field(
        default=None,
        description="Job records: redis://... or sqlite:///path; unset = the broker's Redis, "
        "else sqlite in data_dir (embedded broker); required with an amqp:// broker.",
    )
    models: Path = Field(
        default=Path(__file__).with_name("models.yaml"), description="Path to models.yaml."
    )
    data_dir: Path = Field(
        default_factory=lambda: Path(user_data_dir("pipeq")),
        description="Embedded broker and results: one place per user, whichever folder a command "
        "runs in (made absolute).",
    )
    result_ttl_s: int = Field(default=86_400, gt=0)
    lease_s: float = Field(
        default=30.0,
        gt=0,
        validation_alias=AliasChoices(
            "PIPEQ_LEASE_S", "PIPEQ_VISIBILITY_TIMEOUT", "PIPEQ_VISIBILITY_TIMEOUT_S"
        ),
        description="Seconds before Redis hands a dead worker's unacked jobs to another worker "
        "(kombu's visibility timeout); a live worker renews its jobs' lease every lease_s / 3, "
        "so they never return however long they run. PIPEQ_VISIBILITY_TIMEOUT is the old name.",
    )
    interactive_deadline_s: float | None = Field(
        default=None, gt=0, description="deadline_s of interactive jobs that give none."
    )
    bulk_deadline_s: float | None = Field(
        default=None, gt=0, description="deadline_s of bulk jobs that give none."
    )
    max_backlog: int | None = Field(
        default=None,
        gt=0,
        description="Queued inputs per model and lane above which POST /v1/jobs answers 429.",
    )
    unacked_restore_interval_s: float = Field(
        default=10.0,
        gt=0,
        description="How often a worker sweeps for a dead worker's unacked jobs (kombu's "
        "default sweep is ~100 s, longer than the visibility timeout it enforces).",
    )
    s3_endpoint_url: str | None = None
    s3_bucket: str | None = None
    s3_prefix: str = "pipeq/results"
    s3_result_threshold_bytes: int = Field(
        default=1024 * 1024,
        gt=0,
        description="A result whose JSON is larger goes to S3 (when PIPEQ_S3_BUCKET is set).",
    )
    s3_presign_ttl_s: int = Field(
        default=3600, gt=0, le=7 * 86_400, description="Lifetime of a presigned result_url."
    )
    webhook_secret: str | None = Field(
        default=None, description="whsec_<base64>; required by `pipeq webhooks worker`."
    )
    webhook_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Deadline for one delivery attempt as a whole, however slowly the receiver "
        "sends its answer.",
    )
    webhook_retry_span_s: float = Field(
        default=86_400.0,
        gt=0,
        description="How long after its first attempt a failing webhook is retried before it "
        "becomes a dead letter.",
    )
    webhook_backoff_first_s: float = Field(
        default=1.0, gt=0, description="The first retry delay; each next one doubles (jittered)."
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated `key` or `key=whsec_<base64>` entries; each key is a tenant "
        "with its own job ids, and one with a secret gets its webhooks signed with it.",
    )
    api_url: str | None = Field(
        default=None,
        description="The HTTP API that `pipeq submit`, `get` and `cancel` talk to; unset = the "
        "broker and record store directly.",
    )
    api_key: str | None = Field(
        default=None, description="The key those commands send (one of the API's PIPEQ_API_KEYS)."
    )
    allow_private_urls: bool = False
    media_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    max_media_bytes: int = Field(default=50 * 1024 * 1024, gt=0)
    max_request_bytes: int | None = Field(
        default=None,
        gt=0,
        description="Cap on one HTTP request body (413 above it, before it is read whole); "
        "unset = one inline input of PIPEQ_MAX_MEDIA_BYTES as base64 plus 1 MiB.",
    )
    max_text_chars: int = Field(
        default=100_000,
        gt=0,
        description="Cap on the characters of one text input, or of a document input's question "
        "plus its word_boxes' words: 413 at submit, a TextTooLong input error in the worker.",
    )
    max_image_pixels: int = Field(
        default=40_000_000,
        gt=0,
        description="Cap on width x height of an image before it is decoded (an A4 page at 300 "
        "dpi is 8.7 MP); a JPEG over it is decoded at 1/2, 1/4 or 1/8 scale when that fits.",
    )
    max_audio_sample_rate: int = Field(
        default=192_000, gt=0, description="Audio with a higher sample rate is refused."
    )
    max_audio_channels: int = Field(
        default=8, gt=0, description="Audio with more channels is refused."
    )
    media_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Deadline for one URL fetch as a whole: every redirect hop, retry and body "
        "byte, however slowly the server sends them. Also S3's connect and read timeouts.",
    )
    ocr_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Tesseract's time per document (document QA inputs sent without "
        "word_boxes); past it that input fails with OcrTimeout.",
    )
    ocr_concurrency: int | None = Field(
        default=None,
        ge=1,
        description="Tesseract runs at once in one worker process; `pipeq worker` gives each of "
        "its processes the host's cores divided among them.",
    )
    flower_basic_auth: str | None = None
    wait_poll_interval_s: float = Field(default=0.05, gt=0)
    log_level: str = "INFO"
    task_events: bool = Field(
        default=True,
        description="Per-job Celery events for Flower: three extra broker round trips per job on "
        "the worker's consumer thread, which caps one process near 200-250 jobs/s of one input.",
    )
    metrics_port: int = Field(
        default=9300, ge=0, description="Worker Prometheus port (+ GPU index); 0 = off."
    )
    metrics_host: str = Field(
        default="127.0.0.1",
        description="Address the worker's Prometheus endpoint binds; 0.0.0.0 to let a scraper "
        "on another host in.",
    )
    max_deliveries: int = Field(
        default=3,
        ge=1,
        description="Times a job may be started; a job whose worker died on each of them fails "
        "as PoisonJob on its next delivery instead of taking down another worker.",
    )
    worker_memory_headroom_mb: int = Field(
        default=8192,
        ge=0,
        description="How far a worker process's private memory (RLIMIT_DATA) may grow past what "
        "it held with its models loaded; an allocation past it fails the input being prepared "
        "(OutOfMemory) instead of the kernel killing the worker. 0 = no bound.",
    )

    _split_lists = field_validator("api_keys", "media_roots", mode="before")(_split_commas)

    @field_validator("data_dir")
    @classmethod
    def _absolute_data_dir(cls, folder: Path) -> Path:
        return folder.expanduser().resolve()

    @field_validator("media_roots")
    @classmethod
    def _resolve_roots(cls, roots: list[Path]) -> list[Path]:
        # Symlinks and `..` are resolved once here, so the per-path check is a prefix test.
        return [root.expanduser().resolve() for root in roots]

    @field_validator("api_keys")
    @classmethod
    def _keys_named(cls, entries: list[str]) -> list[str]:
        # ConfigError, not ValueError: pydantic would print the value, keys and all. An empty
        # key would let in a request that sends none.
        if any(not entry.partition("=whsec_")[0] for entry in entries):
            raise ConfigError("an entry of PIPEQ_API_KEYS has a webhook secret but no key")
        return entries

    @property
    def api_key_secrets(self) -> dict[str, str | None]:
        """Each API key and its own webhook secret (None: signed with PIPEQ_WEBHOOK_SECRET)."""
        keys: dict[str, str | None] = {}
        for entry in self.api_keys:
            # Split at "=whsec_", not "=": a base64 key may end in "=" padding.
            key, mark, secret = entry.partition("=whsec_")
            keys[key] = f"whsec_{secret}" if mark else None
        return keys

    @property
    def visibility_timeout_s(self) -> float:
        return self.lease_s

    @property
    def request_bytes_limit(self) -> int:
        if self.max_request_bytes is not None:
            return self.max_request_bytes
        # Derived, so raising PIPEQ_MAX_MEDIA_BYTES alone keeps the largest inline input postable.
        return 4 * -(-self.max_media_bytes // 3) + (1 << 20)

    def default_deadline_s(self, lane: str) -> float | None:
        return self.interactive_deadline_s if lane == "interactive" else self.bulk_deadline_s

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_variables(cls, values: Any) -> Any:
        """A misspelt PIPEQ_* variable stops start-up: pydantic-settings ignores it, and the
        service would run on the default it was meant to replace."""
        known = known_variables()
        unknown = sorted(
            name for name in os.environ if name.startswith("PIPEQ_") and name not in known
        )
        if unknown:
            name = unknown[0]
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else " (see README, Configuration)"
            raise ConfigError(f"unknown setting {name}{hint}")
        return values

    @model_validator(mode="after")
    def _amqp_needs_result_url(self) -> Settings:
        # Not a ValueError, so pydantic lets it through as is and `pipeq` prints it plainly. An
        # sqlite file per host would split job records between the API and each worker.
        if not self.result_url and (self.broker_url or "").split("://", 1)[0] in (
            "amqp",
            "amqps",
            "pyamqp",
        ):
            raise ConfigError(
                "PIPEQ_BROKER_URL is RabbitMQ (amqp://): set PIPEQ_RESULT_URL too (job records "
                "live in Redis, e.g. redis://host:6379/0); RabbitMQ holds only the queues"
            )
        return self

    # Properties, not cached: a cached value would survive `model_copy(update=...)` and point a
    # copy with another broker_url or result_url at the original's store.
    @property
    def embedded(self) -> bool:
        return self.broker_url is None

    @property
    def effective_result_url(self) -> str:
        if self.result_url:
            return self.result_url
        if self.broker_url and self.broker_url.startswith(("redis://", "rediss://")):
            return self.broker_url
        return f"sqlite:///{(self.data_dir / 'results.sqlite').resolve()}"


def known_variables() -> list[str]:
    """Every PIPEQ_* name Settings reads, old aliases included."""
    names = []
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names += [choice for choice in alias.choices if isinstance(choice, str)]
        else:
            names.append(f"PIPEQ_{name.upper()}")
    return names
