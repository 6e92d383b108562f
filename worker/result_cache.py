"""The opt-in result cache (models.yaml `cache_ttl_s`): one Redis key per (model, revision, call
params, input content) holding the postprocessed output as JSON.

The content is hashed after fetch and decode (the text, the image's pixels, the audio samples),
so the same bytes under another URL hit, and the same URL with new bytes misses. The key holds
the model's name, weights and revision and the merged call params, so nothing crosses models or
params.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import numpy as np
import redis
from PIL import Image

from pipeq.config.registry import ModelSpec

log = logging.getLogger(__name__)

_KEY = "pipeq:cache:"
MISS = object()


def _feed(digest: Any, value: Any) -> None:
    if isinstance(value, str):
        digest.update(b"s" + value.encode())
    elif isinstance(value, bytes):
        digest.update(b"b" + value)
    elif isinstance(value, Image.Image):
        digest.update(f"i{value.mode}{value.size}".encode() + value.tobytes())
    elif isinstance(value, np.ndarray):
        header = f"a{value.dtype}{value.shape}".encode()
        digest.update(header + np.ascontiguousarray(value).tobytes())
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            _feed(digest, str(key))
            _feed(digest, value[key])
    elif isinstance(value, list | tuple):
        digest.update(b"l%d" % len(value))
        for item in value:
            _feed(digest, item)
    else:
        digest.update(b"r" + repr(value).encode())


def cache_key(spec: ModelSpec, params_key: str, loaded: Any) -> str:
    digest = hashlib.sha256(json.dumps([spec.name, spec.model, spec.revision, params_key]).encode())
    _feed(digest, loaded)
    return _KEY + digest.hexdigest()


class ResultCache:
    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    def get(self, key: str) -> Any:
        raw = self._redis.get(key)
        return MISS if raw is None else json.loads(raw)

    def put(self, key: str, output: Any, ttl_s: int) -> None:
        self._redis.set(key, json.dumps(output), ex=ttl_s)


def open_cache(result_url: str) -> ResultCache | None:
    if not result_url.startswith(("redis://", "rediss://", "unix://")):
        return None
    return ResultCache(redis.Redis.from_url(result_url, socket_timeout=5, socket_connect_timeout=5))


class CacheHook:
    """The job path's result-cache hook: a no-op for a model without `cache_ttl_s`, or where
    the result store is not Redis. A failed cache write never fails the input."""

    def __init__(self, cache: ResultCache | None) -> None:
        self._cache = cache

    def key(self, spec: ModelSpec, params_key: str, loaded: Any) -> str | None:
        if spec.cache_ttl_s is None or self._cache is None:
            return None
        return cache_key(spec, params_key, loaded)

    def lookup(self, key: str) -> Any:
        assert self._cache is not None  # a key is only made with a cache
        return self._cache.get(key)

    def remember(self, spec: ModelSpec, key: str | None, output: Any) -> None:
        if key is None or spec.cache_ttl_s is None or self._cache is None:
            return
        try:
            self._cache.put(key, output, spec.cache_ttl_s)
        except Exception as exc:  # noqa: BLE001 - a cache write never fails the input
            log.warning("result cache write failed: %r", exc)
