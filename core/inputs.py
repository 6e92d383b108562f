"""A job's inputs on the wire: texts, media references (URL, S3 URI, local path, inline data) and
documents; their validation is what a producer may send."""

from __future__ import annotations

import base64
import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

STRICT = ConfigDict(extra="forbid", frozen=True)

# Each pattern is what its validator below accepts, stated in the OpenAPI document too, so that
# a client (or Schemathesis) that follows the schema is never refused. The validators stay the
# check: their messages say what to send instead.
HTTP_URL_PATTERN = r"^[Hh][Tt][Tt][Pp][Ss]?://"
S3_URI_PATTERN = r"^s3://[^/]+/[\s\S]"
# Canonical base64 (RFC 4648): whole groups of four, padding only at the end.
BASE64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
# The same strings, checked without a repeated group (Python's re keeps a mark per repetition:
# over 100 MB for 4 MB of data): a length of whole groups, then the alphabet and 0-2 '='.
_BASE64_CHARS = re.compile(r"[A-Za-z0-9+/]*={0,2}")


class UrlRef(BaseModel):
    model_config = STRICT
    url: str = Field(json_schema_extra={"pattern": HTTP_URL_PATTERN})

    @field_validator("url")
    @classmethod
    def _http_only(cls, url: str) -> str:
        if not url.lower().startswith(("http://", "https://")):
            scheme = url.partition(":")[0] if ":" in url else ""
            named = f"the URL scheme {scheme!r}" if scheme else "a URL without a scheme"
            raise ValueError(
                f"{named} is not accepted: use http://, https:// or {{'s3': 's3://bucket/key'}}"
            )
        return url


class S3Ref(BaseModel):
    model_config = STRICT
    s3: str = Field(json_schema_extra={"pattern": S3_URI_PATTERN})

    @field_validator("s3")
    @classmethod
    def _s3_uri(cls, uri: str) -> str:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        if not uri.startswith("s3://") or not bucket or not key:
            raise ValueError("s3 must look like s3://bucket/key")
        return uri


class PathRef(BaseModel):
    model_config = STRICT
    path: str = Field(min_length=1)


class DataRef(BaseModel):
    model_config = STRICT
    data: str = Field(description="base64", json_schema_extra={"pattern": BASE64_PATTERN})
    mime: str | None = None

    @field_validator("data")
    @classmethod
    def _base64(cls, data: str) -> str:
        # fullmatch, not a `$`, which in Python also matches before a final newline.
        if len(data) % 4 or not _BASE64_CHARS.fullmatch(data):
            raise ValueError(
                "data is not valid base64: groups of 4 of A-Z, a-z, 0-9, + and /, '=' padding "
                "only at the end"
            )
        return data

    def decoded_size(self) -> int:
        return len(base64.b64decode(self.data))


_KEYS = ("url", "s3", "path", "data", "image")
MEDIA_REFS = "an object with one of url, s3, path or data"
_ANY = f"a string (text), {MEDIA_REFS}, or a document ({{'image', 'question'}})"


def input_kind(value: Any) -> str | None:
    """Which member of the input union `value` is meant as: by its key, so that a bad input
    gets its member's one error, not one per member."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, BaseModel):
        return next((key for key in _KEYS if key in type(value).model_fields), None)
    if isinstance(value, dict):
        return next((key for key in _KEYS if key in value), None)
    return None


MediaRef = Annotated[
    Annotated[UrlRef, Tag("url")]
    | Annotated[S3Ref, Tag("s3")]
    | Annotated[PathRef, Tag("path")]
    | Annotated[DataRef, Tag("data")],
    Discriminator(
        input_kind, custom_error_type="media", custom_error_message=f"expected {MEDIA_REFS}"
    ),
]


class DocumentInput(BaseModel):
    """document-question-answering: an image and a question, optionally pre-computed OCR."""

    model_config = STRICT
    image: MediaRef
    question: str = Field(min_length=1)
    word_boxes: list[tuple[str, tuple[int, int, int, int]]] | None = None


Input = Annotated[
    Annotated[str, Tag("text")]
    | Annotated[UrlRef, Tag("url")]
    | Annotated[S3Ref, Tag("s3")]
    | Annotated[PathRef, Tag("path")]
    | Annotated[DataRef, Tag("data")]
    | Annotated[DocumentInput, Tag("image")],
    Discriminator(input_kind, custom_error_type="input", custom_error_message=f"expected {_ANY}"),
]


def text_chars(item: Input) -> int:
    """Characters of text an input hands the tokenizer: a string's, or a document's question
    plus its words (each word box counted as at least one, since each becomes a token)."""
    if isinstance(item, str):
        return len(item)
    if isinstance(item, DocumentInput):
        words = sum(max(1, len(word)) for word, _ in item.word_boxes or [])
        return len(item.question) + words
    return 0
