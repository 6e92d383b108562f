"""Job inputs -> what `transformers.pipeline()` takes: fetch a media reference, then decode it.

`MediaLoader.fetch` reads the bytes of an http(s) URL, an `s3://` object, a file under
PIPEQ_MEDIA_ROOTS or inline base64, never more than PIPEQ_MAX_MEDIA_BYTES of them. `load` decodes
one input for a modality (`pipeq.worker.decode`), `load_many` does a batch on a thread pool. Every
failure is an `InputError` that fails its own input only.

URLs are guarded against SSRF (`pipeq.core.urlguard`: only checked public addresses are connected to)
unless PIPEQ_ALLOW_PRIVATE_URLS is set, and redirects are followed here, one checked hop at a
time, never by httpx. PIPEQ_MEDIA_TIMEOUT_S bounds a whole URL fetch: every hop, retry and byte.
"""

from __future__ import annotations

import base64
import os
import stat
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from functools import partial
from typing import Any

import boto3
import httpx
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError, ConnectTimeoutError, ReadTimeoutError

from pipeq.config.errors import (
    DecodeError,
    FetchFailed,
    InputError,
    MediaNotFound,
    MediaTimeout,
    TextTooLong,
    UnsafeReference,
)
from pipeq.config.settings import Settings
from pipeq.core.inputs import (
    DataRef,
    DocumentInput,
    Input,
    MediaRef,
    PathRef,
    S3Ref,
    UrlRef,
    text_chars,
)
from pipeq.core.urlguard import checked_url, deadline, time_left
from pipeq.worker.decode import decode_audio, decode_image
from pipeq.worker.guarded_network import guarded_client
from pipeq.worker.http_body import (
    READ_CHUNK_BYTES,
    decoded,
    read_capped,
    refuse_declared_size,
    too_large,
)
from pipeq.worker.local_paths import open_beneath

# Fetching is I/O bound; 16 threads keep a GPU batch's worth of downloads in flight.
LOAD_THREADS = 16
MAX_REDIRECTS = 5
HTTP_ATTEMPTS = 3
RETRY_BACKOFF_S = 0.25
_NOT_FOUND_S3_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})
_IDENTITY = {"accept-encoding": "identity"}


class _ServerError(Exception):
    """A 5xx answer: worth another try, unlike a 4xx."""

    def __init__(self, status_code: int) -> None:
        super().__init__(f"HTTP {status_code}")
        self.status_code = status_code


class MediaLoader:
    """Fetches and decodes job inputs with the limits in `Settings`. Thread-safe."""

    def __init__(
        self, settings: Settings, *, http: httpx.Client | None = None, s3: Any | None = None
    ) -> None:
        self._settings = settings
        self._owns_http = http is None
        self._owns_s3 = s3 is None
        self._http = _default_http_client(settings) if http is None else http
        self._s3 = _default_s3_client(settings) if s3 is None else s3
        self._pool = ThreadPoolExecutor(LOAD_THREADS, thread_name_prefix="pipeq-media")

    @property
    def settings(self) -> Settings:
        return self._settings

    def fetch(self, ref: MediaRef) -> bytes:
        """The raw bytes of a reference, at most `settings.max_media_bytes` of them."""
        if isinstance(ref, UrlRef):
            return self._fetch_url(ref.url)
        if isinstance(ref, S3Ref):
            return self._fetch_s3(ref.s3)
        if isinstance(ref, PathRef):
            return self._read_path(ref.path)
        return self._decode_data(ref)

    def load(self, item: Input, modality: str) -> Any:
        """One job input -> what `pipeline()` takes for `modality`.

        'text': the string; 'image': an RGB `PIL.Image` with EXIF orientation applied; 'audio':
        `{"raw": float32 mono array, "sampling_rate": 16000}`; 'document': `{"image", "question"}`
        plus "word_boxes" when given. Raises only `InputError` subclasses, except `ValueError` for
        a modality that is none of these (a bug in the caller, not in the input).
        """
        ref = self._checked_ref(item, modality)
        if ref is None:
            return item
        return self._decode(item, modality, self.fetch(ref))

    def load_many(self, items: list[Input], modality: str) -> list[Any | InputError]:
        """`load` for each item on the thread pool; each identical reference is fetched once."""
        results: list[Any | InputError] = [None] * len(items)
        groups: dict[MediaRef, list[int]] = {}
        for index, item in enumerate(items):
            try:
                ref = self._checked_ref(item, modality)
            except InputError as exc:
                results[index] = exc
                continue
            if ref is None:
                results[index] = item
            else:
                groups.setdefault(ref, []).append(index)
        futures: dict[Future[list[Any | InputError]], list[int]] = {
            self._pool.submit(self._load_group, ref, [items[i] for i in indices], modality): indices
            for ref, indices in groups.items()
        }
        for future, indices in futures.items():
            for index, result in zip(indices, future.result(), strict=True):
                results[index] = result
        return results

    def close(self) -> None:
        """Stop the thread pool and close the clients this loader created (not injected ones)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._owns_http:
            self._http.close()
        if self._owns_s3:
            self._s3.close()

    def _checked_ref(self, item: Input, modality: str) -> MediaRef | None:
        """`media_ref`, after refusing too much text: a message published by hand never passed
        the check at submit."""
        ref = media_ref(item, modality)
        chars = text_chars(item)
        if chars > self._settings.max_text_chars:
            raise TextTooLong(
                f"{chars} characters of text, over PIPEQ_MAX_TEXT_CHARS "
                f"({self._settings.max_text_chars})"
            )
        return ref

    def _load_group(self, ref: MediaRef, items: list[Input], modality: str) -> list[Any]:
        try:
            data = self.fetch(ref)
        except InputError as exc:
            return [exc] * len(items)
        return [self._decode_or_error(item, modality, data) for item in items]

    def _decode_or_error(self, item: Input, modality: str, data: bytes) -> Any:
        try:
            return self._decode(item, modality, data)
        except InputError as exc:
            return exc

    def _decode(self, item: Input, modality: str, data: bytes) -> Any:
        settings = self._settings
        if modality == "image":
            return decode_image(data, max_pixels=settings.max_image_pixels)
        if modality == "audio":
            return decode_audio(
                data,
                # Decoded audio is capped like fetched bytes: 16 kHz float32 samples, 4 bytes each.
                max_samples=settings.max_media_bytes // 4,
                max_rate=settings.max_audio_sample_rate,
                max_channels=settings.max_audio_channels,
            )
        assert isinstance(item, DocumentInput)  # media_ref() let only documents through
        image = decode_image(data, max_pixels=settings.max_image_pixels)
        document: dict[str, Any] = {"image": image, "question": item.question}
        # Absent, not None: the pipeline runs OCR (Tesseract) only when the key is missing.
        if item.word_boxes is not None:
            document["word_boxes"] = [(word, list(box)) for word, box in item.word_boxes]
        return document

    # --- http(s) -------------------------------------------------------------------------------

    def _fetch_url(self, url: str) -> bytes:
        hop, allow_private = _parse_url(url), self._settings.allow_private_urls
        # httpx's timeouts are per socket operation: a server that sends a header line or a body
        # byte now and then would hold the fetch without end. One deadline bounds it all.
        with deadline(self._settings.media_timeout_s):
            for _ in range(MAX_REDIRECTS + 1):
                outcome = self._get_with_retries(checked_url(hop, allow_private))
                if isinstance(outcome, bytes):
                    return outcome
                hop = outcome
        raise FetchFailed(f"{url} redirected more than {MAX_REDIRECTS} times")

    def _get_with_retries(self, url: httpx.URL) -> bytes | httpx.URL:
        attempt = 1
        while True:
            try:
                return self._get_once(url)
            except (httpx.TransportError, _ServerError) as exc:
                pause_s = RETRY_BACKOFF_S * 2 ** (attempt - 1)
                if attempt == HTTP_ATTEMPTS or time_left() <= pause_s:
                    raise _after_retries(exc, url, attempt) from exc
                time.sleep(pause_s)
                attempt += 1

    def _get_once(self, url: httpx.URL) -> bytes | httpx.URL:
        """The body of one GET, or the next hop's URL when the answer is a redirect."""
        limit = self._settings.max_media_bytes
        with self._http.stream("GET", url, headers=_IDENTITY, follow_redirects=False) as response:
            if response.is_redirect:
                return _parse_url(str(response.url), response.headers["location"])
            _raise_for_status(response)
            refuse_declared_size(response, limit, str(url))
            return read_capped(decoded(response, limit, str(url)), limit, str(url))

    # --- s3, local paths, inline data ----------------------------------------------------------

    def _fetch_s3(self, uri: str) -> bytes:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        limit = self._settings.max_media_bytes
        try:
            obj = self._s3.get_object(Bucket=bucket, Key=key)
            # closing(), not `with body`: StreamingBody.__enter__ hands out the raw urllib3 stream.
            with closing(obj["Body"]) as body:
                if obj.get("ContentLength", 0) > limit:
                    raise too_large(uri, limit)
                return read_capped(body.iter_chunks(READ_CHUNK_BYTES), limit, uri)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _NOT_FOUND_S3_CODES:
                raise MediaNotFound(f"{uri} does not exist ({code})") from exc
            raise FetchFailed(f"S3 refused {uri}: {code or exc}") from exc
        except (ConnectTimeoutError, ReadTimeoutError) as exc:
            raise MediaTimeout(f"S3 did not answer for {uri} in time: {exc}") from exc
        except BotoCoreError as exc:
            raise FetchFailed(f"could not read {uri}: {exc}") from exc

    def _read_path(self, raw: str) -> bytes:
        fd = open_beneath(raw, self._settings.media_roots)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise MediaNotFound(f"{raw} is not a regular file")
        with os.fdopen(fd, "rb") as file:
            chunks = iter(partial(file.read, READ_CHUNK_BYTES), b"")
            return read_capped(chunks, self._settings.max_media_bytes, raw)

    def _decode_data(self, ref: DataRef) -> bytes:
        data = base64.b64decode(ref.data)
        if len(data) > self._settings.max_media_bytes:
            raise too_large("inline data", self._settings.max_media_bytes)
        return data


def media_ref(item: Input, modality: str) -> MediaRef | None:
    """The reference to fetch for `item`, None for text; refuses inputs of the wrong shape."""
    if modality == "text":
        if isinstance(item, str):
            return None
        raise DecodeError("text models take strings, not a media reference or document")
    if modality == "document":
        if isinstance(item, DocumentInput):
            return item.image
        raise DecodeError("document question answering takes {'image': MEDIA, 'question': str}")
    if modality in ("image", "audio"):
        if isinstance(item, str | DocumentInput):
            raise DecodeError(
                f"{modality} models take one media reference: {{'url'}}, {{'s3'}}, {{'path'}} "
                "or {'data', 'mime'}"
            )
        return item
    raise ValueError(f"unknown modality {modality!r}")


def _parse_url(base: str, reference: str = "") -> httpx.URL:
    try:
        return httpx.URL(base).join(reference)
    except httpx.InvalidURL as exc:
        raise UnsafeReference(f"not a valid URL: {reference or base!r} ({exc})") from exc


def _raise_for_status(response: httpx.Response) -> None:
    status = response.status_code
    if response.is_success:
        return
    if status in (404, 410):
        raise MediaNotFound(f"{response.url} answered HTTP {status}")
    if status >= 500:
        raise _ServerError(status)
    raise FetchFailed(f"{response.url} answered HTTP {status}")


def _after_retries(exc: Exception, url: httpx.URL, attempts: int) -> InputError:
    tries = f"after {attempts} {'try' if attempts == 1 else 'tries'}"
    if isinstance(exc, httpx.TimeoutException):
        return MediaTimeout(
            f"{url.host} answered too slowly: not fetched within PIPEQ_MEDIA_TIMEOUT_S {tries}"
        )
    if isinstance(exc, _ServerError):
        return FetchFailed(f"{url} answered HTTP {exc.status_code} {tries}")
    return FetchFailed(f"could not fetch {url} {tries}: {exc}")


def _default_http_client(settings: Settings) -> httpx.Client:
    return guarded_client(
        settings.media_timeout_s,
        settings.allow_private_urls,
        limits=httpx.Limits(max_connections=LOAD_THREADS, max_keepalive_connections=LOAD_THREADS),
    )


def _default_s3_client(settings: Settings) -> Any:
    config = BotoConfig(
        connect_timeout=settings.media_timeout_s,
        read_timeout=settings.media_timeout_s,
        retries={"max_attempts": HTTP_ATTEMPTS, "mode": "standard"},
        max_pool_connections=LOAD_THREADS,
    )
    return boto3.client("s3", endpoint_url=settings.s3_endpoint_url, config=config)
