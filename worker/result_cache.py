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
from typing import Any

import numpy as np
import redis
from PIL import Image

from pipeq.config.registry import ModelSpec

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
