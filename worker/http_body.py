"""Reading an HTTP response body under a size cap: the declared size checked first, then the bytes
as they arrive, through any Content-Encoding decoded under the same cap."""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator

import httpx

from pipeq.config.errors import (
    FetchFailed,
    MediaTooLarge,
    UnsupportedEncoding,
)

# The one Content-Encoding layer a server that compresses anyway may use (zlib's wbits for it).
READ_CHUNK_BYTES = 1 << 16
_INFLATE_WBITS = {
    "gzip": 16 + zlib.MAX_WBITS,
    "x-gzip": 16 + zlib.MAX_WBITS,
    "deflate": zlib.MAX_WBITS,
}


def read_capped(chunks: Iterable[bytes], limit: int, source: str) -> bytes:
    """Join `chunks`, raising `MediaTooLarge` as soon as they pass `limit` bytes."""
    buffer = bytearray()
    for chunk in chunks:
        buffer += chunk
        if len(buffer) > limit:
            raise too_large(source, limit)
    return bytes(buffer)


def decoded(response: httpx.Response, limit: int, source: str) -> Iterator[bytes]:
    """The body without its Content-Encoding, in pieces of at most `READ_CHUNK_BYTES`.

    Not httpx's decoding: it inflates each network chunk whole, through every stacked layer, so
    a few hundred bytes of gzip-of-gzip become gigabytes in one call before any cap is checked.
    One gzip or deflate layer is inflated here in bounded steps that `read_capped` counts.
    """
    codings = [
        coding.strip().lower()
        for coding in response.headers.get_list("content-encoding", split_commas=True)
        if coding.strip().lower() not in ("", "identity")
    ]
    if not codings:
        yield from response.iter_raw(READ_CHUNK_BYTES)
        return
    if len(codings) > 1 or codings[0] not in _INFLATE_WBITS:
        raise UnsupportedEncoding(
            f"{source} came with Content-Encoding {', '.join(codings)}; pipeq asks for identity "
            "and decodes at most one gzip or deflate layer"
        )
    inflater = zlib.decompressobj(_INFLATE_WBITS[codings[0]])
    received = 0
    try:
        for raw in response.iter_raw(READ_CHUNK_BYTES):
            received += len(raw)
            if received > limit:  # compressed bytes that inflate to little still arrive
                raise too_large(source, limit)
            piece = inflater.decompress(raw, READ_CHUNK_BYTES)
            while piece:
                yield piece
                # The input zlib left for want of room, or output it still holds back.
                piece = inflater.decompress(inflater.unconsumed_tail, READ_CHUNK_BYTES)
            if inflater.eof:
                return  # what follows the compressed stream is not part of it (httpx agrees)
    except zlib.error as exc:
        raise FetchFailed(f"{source} is not the {codings[0]} it says it is: {exc}") from exc
    raise FetchFailed(f"{source} ends inside its {codings[0]}-compressed body")


def refuse_declared_size(response: httpx.Response, limit: int, source: str) -> None:
    # Content-Length counts encoded bytes; the cap is on decoded ones, so only trust it unencoded.
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and "content-encoding" not in response.headers and int(declared) > limit:
        raise too_large(source, limit)


def too_large(source: str, limit: int) -> MediaTooLarge:
    return MediaTooLarge(f"{source} is larger than PIPEQ_MAX_MEDIA_BYTES ({limit} bytes)")
