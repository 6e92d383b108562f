"""Manifests for `pipeq backfill`, streamed: JSONL, CSV, a plain list, or an S3 prefix listing.

Every entry becomes an `Item` (id, validated input) or a `BadLine` (id, line number, why), so one
malformed line is reported and the rest of the manifest goes on. Ids are given (`{"id", "input"}`
in JSONL, an `id` column in CSV), the object's URI in an S3 listing, else the line number.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import TypeAdapter, ValidationError

from pipeq.core.inputs import Input


def parse_input(text: str) -> Any:
    """A CLI input: a JSON object as given, a URL or s3:// URI, an existing file, else text."""
    if text.startswith("{"):
        return json.loads(text)
    if text.startswith(("http://", "https://")):
        return {"url": text}
    if text.startswith("s3://"):
        return {"s3": text}
    if os.path.exists(text):
        return {"path": str(Path(text).resolve())}
    return text


ManifestFormat = Literal["jsonl", "csv", "list"]

INPUT: TypeAdapter[Input] = TypeAdapter(Input)


@dataclass(frozen=True)
class Item:
    """One manifest entry: its id (given, the S3 URI, else the line number) and its input."""

    id: str
    input: Input
    line: int = field(default=0, compare=False)  # where it was read, for a bad-line report


@dataclass(frozen=True)
class BadLine:
    """A manifest line that is not an input; written to `failed-*.jsonl`, never sent."""

    id: str
    line: int
    message: str


def read_manifest(
    source: str,
    manifest_format: ManifestFormat | None = None,
    column: str | None = None,
    s3: Any | None = None,
) -> Iterator[Item | BadLine]:
    """Stream a manifest: JSONL, CSV (`column`), a plain list, or an `s3://bucket/prefix/` list."""
    if source.startswith("s3://"):
        yield from _s3_listing(source, s3 or s3_client(None))
        return
    kind = manifest_format or _format_of(source)
    with open(source, "rb") as raw:
        if kind == "csv":
            yield from _csv_items(
                io.TextIOWrapper(raw, "utf-8", errors="replace", newline=""), column
            )
            return
        for number, data in enumerate(raw, start=1):
            try:
                text = data.decode().strip()
            except UnicodeDecodeError as exc:
                yield BadLine(str(number), number, f"not UTF-8: {exc}")
                continue
            if text:
                yield (
                    _jsonl_item(text, number)
                    if kind == "jsonl"
                    else _text_item(str(number), text, number)
                )


def _format_of(path: str) -> ManifestFormat:
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    return "csv" if suffix == ".csv" else "list"


def _item(item_id: str, raw: Any, number: int) -> Item | BadLine:
    try:
        return Item(item_id, INPUT.validate_python(raw), number)
    except ValidationError as exc:
        return BadLine(item_id, number, f"not an input: {exc.errors()[0]['msg']}")


def _jsonl_item(text: str, number: int) -> Item | BadLine:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return BadLine(str(number), number, f"not JSON: {exc}")
    # A record {"id", "input", ...}: other keys are ignored, so failed-*.jsonl is a manifest too.
    if isinstance(value, dict) and "input" in value:
        given = value.get("id")
        return _item(str(number) if given in (None, "") else str(given), value["input"], number)
    return _item(str(number), value, number)


def _text_item(item_id: str, text: str, number: int) -> Item | BadLine:
    """A line of a plain list or a CSV cell, read like `pipeq submit` reads its INPUTs."""
    try:
        return _item(item_id, parse_input(text), number)
    except json.JSONDecodeError as exc:
        return BadLine(item_id, number, f"not JSON: {exc}")


def _csv_items(text: io.TextIOBase, column: str | None) -> Iterator[Item | BadLine]:
    reader = csv.DictReader(text)
    names = reader.fieldnames or []
    if column is None and len(names) == 1:
        column = names[0]
    if column is None or column not in names:
        raise ValueError(f"pick the CSV column that holds the inputs with --column; it has {names}")
    for row in reader:
        item_id = (row.get("id") if column != "id" else None) or str(reader.line_num)
        cell = row[column]
        if cell is None:
            yield BadLine(item_id, reader.line_num, f"no {column!r} column in this row")
        else:
            yield _text_item(item_id, cell, reader.line_num)


def _s3_listing(uri: str, s3: Any) -> Iterator[Item | BadLine]:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    number = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for entry in page.get("Contents", []):
            if not entry["Key"].endswith("/"):
                number += 1
                key = f"s3://{bucket}/{entry['Key']}"
                yield _item(key, {"s3": key}, number)


def count_entries(source: str) -> int | None:
    """Lines in a local manifest (an upper bound on its entries), for the progress bar's ETA."""
    if source.startswith("s3://"):
        return None
    lines = 0
    with open(source, "rb") as raw:
        while block := raw.read(1 << 20):
            lines += block.count(b"\n")
    return lines - (1 if _format_of(source) == "csv" else 0)


def s3_client(endpoint_url: str | None) -> Any:
    try:
        import boto3
    except ImportError as exc:
        raise ValueError("S3 manifests and outputs need boto3: pip install boto3") from exc
    return boto3.client("s3", endpoint_url=endpoint_url)
