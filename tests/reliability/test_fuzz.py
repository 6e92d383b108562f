"""Fuzz the job schema: hypothesis posts random JSON bodies, and mutations of a valid one, to
`POST /v1/jobs`; none may get a 5xx. The API runs in-process (FastAPI's TestClient) over a Client
on a private Redis (`own_redis`) that no worker consumes, so accepted bodies just stay queued."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeq.producer.api import create_app
from pipeq.producer.client import Client

pytestmark = pytest.mark.reliability

VALID: dict[str, Any] = {
    "model": "tiny-sentiment",
    "inputs": ["a fine day"],
    "params": {"top_k": 1},
    "priority": "bulk",
    "id": "fuzz-1",
    "webhook": {"url": "https://example.com/hook", "events": ["succeeded"]},
    "store": "redis",
    "deadline_s": 60,
}

# Odd unicode: lone surrogates, NUL, bidi overrides, combining marks, astral plane, BOM.
ODD = st.sampled_from(["\ud800", "\x00", "\u202e", "e\u0301", "\U0001f600", "\ufeff", "\uffff"])
TEXT = st.one_of(st.text(max_size=40), ODD, st.text(alphabet=st.characters(), max_size=8))
NUMBER = st.one_of(
    st.integers(),
    st.integers(min_value=10**18, max_value=10**400),
    st.integers(min_value=-(10**400), max_value=-(10**18)),
    st.floats(allow_nan=False, allow_infinity=False),
)
SCALAR = st.one_of(st.none(), st.booleans(), NUMBER, TEXT)
JSON = st.recursive(
    SCALAR,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(TEXT, inner, max_size=5)),
    max_leaves=30,
)
# A media reference or document input, well- or ill-formed.
REF = st.one_of(
    st.fixed_dictionaries({"url": st.one_of(TEXT, st.just("http://127.0.0.1/x"))}),
    st.fixed_dictionaries({"s3": st.one_of(TEXT, st.just("s3://b/k"))}),
    st.fixed_dictionaries({"path": st.one_of(TEXT, st.just("../../etc/passwd"))}),
    st.fixed_dictionaries({"data": st.one_of(TEXT, st.just("aGVsbG8="))}, optional={"mime": JSON}),
    st.fixed_dictionaries({"image": JSON, "question": JSON}, optional={"word_boxes": JSON}),
)


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    """A valid body with some fields dropped, retyped, or joined by extra keys."""
    body = dict(VALID)
    for field in draw(st.lists(st.sampled_from(sorted(VALID)), max_size=4, unique=True)):
        action = draw(st.sampled_from(["drop", "json", "scalar", "ref"]))
        if action == "drop":
            body.pop(field)
        elif action == "ref":
            body[field] = draw(st.lists(REF, max_size=3))
        else:
            body[field] = draw(JSON if action == "json" else SCALAR)
    body.update(draw(st.dictionaries(TEXT, JSON, max_size=2)))
    return body


BODY = st.one_of(JSON, mutated(), mutated(), mutated())


def test_no_5xx_for_any_body(own_client: Client) -> None:
    http = TestClient(create_app(own_client), raise_server_exceptions=False)
    seen: dict[int, int] = {}

    @settings(
        max_examples=200,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(body=BODY, raw=st.one_of(st.none(), st.binary(max_size=64)))
    def post(body: Any, raw: bytes | None) -> None:
        # json.dumps escapes lone surrogates, and writes a float too large for JSON as Infinity:
        # the parser must cope with both. Sometimes the body is raw bytes, not JSON at all.
        content = raw if raw is not None else json.dumps(body).encode()
        answer = http.post(
            "/v1/jobs", content=content, headers={"Content-Type": "application/json"}
        )
        seen[answer.status_code] = seen.get(answer.status_code, 0) + 1
        assert answer.status_code < 500, (answer.status_code, content[:500], answer.text[:500])

    post()
    print(f"\nfuzz: status codes {dict(sorted(seen.items()))}")
    assert set(seen) <= {200, 202, 404, 409, 413, 422, 429}, seen
