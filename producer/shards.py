"""Where `pipeq backfill` writes: JSONL shards in a local directory or under an S3 prefix."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from pipeq.producer.manifest import s3_client

SHARD_LINES = 10_000


class Store(Protocol):
    """Where shards go: a local directory or an S3 prefix."""

    @property
    def durable(self) -> bool:
        """Everything appended so far is stored."""

    def names(self) -> list[str]: ...

    def lines(self, name: str) -> Iterator[str]: ...

    def append(self, name: str, text: str) -> None: ...

    def seal(self, name: str) -> None: ...

    def put(self, name: str, text: str) -> None: ...


class LocalStore:
    durable = True  # each append is flushed

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self._files: dict[str, io.TextIOWrapper] = {}

    def names(self) -> list[str]:
        return [path.name for path in self.root.iterdir() if path.is_file()]

    def lines(self, name: str) -> Iterator[str]:
        data = (self.root / name).read_bytes()
        if data and not data.endswith(b"\n"):
            # A line cut short by a crash: drop it, so the shard stays valid JSONL.
            data = data[: data.rfind(b"\n") + 1]
            (self.root / name).write_bytes(data)
        return iter(data.decode().splitlines())

    def append(self, name: str, text: str) -> None:
        if name not in self._files:
            self._files[name] = (self.root / name).open("a", encoding="utf-8")
        self._files[name].write(text)
        self._files[name].flush()

    def seal(self, name: str) -> None:
        self._files.pop(name).close()

    def put(self, name: str, text: str) -> None:
        partial = self.root / f".{name}.partial"
        partial.write_text(text)
        partial.replace(self.root / name)


class S3Store:
    """Objects cannot be appended to: a shard is buffered and uploaded when it is sealed."""

    def __init__(self, s3: Any, uri: str) -> None:
        self.bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self._s3 = s3
        self._buffers: dict[str, list[str]] = {}

    @property
    def durable(self) -> bool:
        return not self._buffers

    def names(self) -> list[str]:
        pages = self._s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix, Delimiter="/"
        )
        return [e["Key"].removeprefix(self.prefix) for p in pages for e in p.get("Contents", [])]

    def lines(self, name: str) -> Iterator[str]:
        body = self._s3.get_object(Bucket=self.bucket, Key=self.prefix + name)["Body"]
        return (line.decode() for line in body.iter_lines() if line)

    def append(self, name: str, text: str) -> None:
        self._buffers.setdefault(name, []).append(text)

    def seal(self, name: str) -> None:
        self.put(name, "".join(self._buffers[name]))
        del self._buffers[name]

    def put(self, name: str, text: str) -> None:
        self._s3.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=text.encode())


def open_store(out: str, s3: Any | None = None) -> Store:
    return S3Store(s3 or s3_client(None), out) if out.startswith("s3://") else LocalStore(Path(out))


class Shards:
    """`stem-00000.jsonl`, `stem-00001.jsonl`, ... of at most `size` lines, numbered after those
    already there: a resumed run never appends to an earlier run's shard."""

    def __init__(self, store: Store, stem: str, size: int, existing: list[str]) -> None:
        self.store, self.stem, self.size = store, stem, size
        self.index = 1 + max((shard_index(n, stem) for n in existing), default=-1)
        self.count = 0

    @property
    def name(self) -> str:
        return f"{self.stem}-{self.index:05d}.jsonl"

    def write(self, lines: list[str]) -> None:
        while lines:
            taken = lines[: self.size - self.count]
            self.store.append(self.name, "".join(taken))
            self.count += len(taken)
            lines = lines[len(taken) :]
            if self.count == self.size:
                self.close()

    def close(self) -> None:
        if self.count:
            self.store.seal(self.name)
            self.index, self.count = self.index + 1, 0


def shard_index(name: str, stem: str) -> int:
    number = name.removeprefix(f"{stem}-").removesuffix(".jsonl")
    is_shard = name.startswith(f"{stem}-") and name.endswith(".jsonl") and number.isdigit()
    return int(number) if is_shard else -1


def shard_totals(store: Store) -> dict[str, int]:
    """Lines of the output's part-* (succeeded) and failed-* shards: every earlier run's."""
    totals = {"succeeded": 0, "failed": 0}
    for name in store.names():
        for kind, total in (("part", "succeeded"), ("failed", "failed")):
            if shard_index(name, kind) >= 0:
                totals[total] += sum(1 for _ in store.lines(name))
    return totals


def written_ids(store: Store, names: list[str]) -> set[str]:
    """Every id in the output's shards, finished or failed."""
    done: set[str] = set()
    for name in names:
        if shard_index(name, "part") >= 0 or shard_index(name, "failed") >= 0:
            done.update(json.loads(line)["id"] for line in store.lines(name))
    return done
