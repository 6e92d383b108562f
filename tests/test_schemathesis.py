"""Schemathesis over the real API: every phase (examples, coverage, fuzzing, stateful) and every
check, against uvicorn on loopback with an API key, the real Redis and a worker (so that the
stateful phase's POST -> GET/DELETE chains meet queued, running and finished jobs). Any failure
Schemathesis reports fails the test, with its report.

This file is also Schemathesis's hooks module (SCHEMATHESIS_HOOKS): `filter_case` below."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from pydantic import ValidationError

from pipeq.config.params import MAX_LABEL_CHARS, MAX_LABELS, ZeroShotParams
from pipeq.config.settings import Settings
from pipeq.producer.api import MAX_WAIT_S
from pipeq.producer.client import Client
from pipeq.producer.job_schemas import LABELS_PATTERN
from tests.test_api import serve

ROOT = Path(__file__).resolve().parent.parent
KEY = "schemathesis-key"
SEED = 20261201
MAX_EXAMPLES = 100  # per operation and phase: about 30 s in all, on one core

CONFIG = """\
[generation]
# No example database: each run is the seed's, not replays of earlier failures.
database = "none"

[checks]
# A field over its cap (a text over PIPEQ_MAX_TEXT_CHARS, the schema's maxLength) is refused
# with 413 PayloadTooLarge, as documented; Schemathesis's default refusals lack 413.
negative_data_rejection.expected-statuses = [
    "400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx",
]
"""


@schemathesis.hook
def filter_case(context: Any, case: Any) -> bool:
    """Leave out the cases that break a rule tying two values together, which JSON Schema (so
    the OpenAPI document) cannot state; each rule's 422 is tested where it is made."""
    body = case.body if isinstance(case.body, dict) else {}
    return not (_two_ids(case.headers or {}, body) or _strides_past_chunk(body.get("params")))


def _two_ids(headers: Mapping[str, str], body: Mapping[str, Any]) -> bool:
    """An Idempotency-Key header and a body `id` that differ (test_api.py)."""
    key = next((v for k, v in headers.items() if k.lower() == "idempotency-key"), None)
    return key is not None and body.get("id") not in (None, key)


def _strides_past_chunk(params: Any) -> bool:
    """Speech strides over a third of chunk_length_s (config/params.py, test_security_params.py)."""
    if not isinstance(params, dict):
        return False
    chunk, stride = params.get("chunk_length_s"), params.get("stride_length_s")
    sides = stride if isinstance(stride, list) else [stride]
    numbers = [chunk, *sides]
    if not all(isinstance(n, int | float) and not isinstance(n, bool) for n in numbers):
        return False
    return max(sides) > chunk / 3


@pytest.fixture(scope="module")
def keyed_api(settings: Settings) -> Iterator[httpx.Client]:
    """The API with one API key. Private webhook URLs are let through: the submit-time check
    (httpx's parse of the URL, then DNS) is no schema's to state; test_api.py tests it."""
    update = {"api_keys": [KEY], "allow_private_urls": True}
    yield from serve(Client(settings.model_copy(update=update)))


def schemathesis_run(schema_url: str, config: Path) -> list[str]:
    return [
        *(sys.executable, "-m", "schemathesis.cli", "--config-file", str(config)),
        *("run", schema_url, "--phases", "examples,coverage,fuzzing,stateful", "--checks", "all"),
        # DELETE /v1/jobs/{id} cancels a job, which stays readable as "cancelled" until its
        # TTL (README); use_after_free expects a deleted resource to answer 404.
        *("--exclude-checks", "use_after_free"),
        *("-H", f"Authorization: Bearer {KEY}"),
        *("--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--workers", "1"),
        # A long poll lasts up to `wait` seconds (?wait=, at most MAX_WAIT_S).
        *("--request-timeout", str(MAX_WAIT_S + 15), "--output-truncate", "true"),
    ]


@pytest.mark.timeout(300)
@pytest.mark.usefixtures("session_worker")
def test_schemathesis_finds_nothing(keyed_api: httpx.Client, tmp_path: Path) -> None:
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    command = schemathesis_run(str(keyed_api.base_url.join("/openapi.json")), config)
    env = {**os.environ, "SCHEMATHESIS_HOOKS": __file__, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280
    )
    report = run.stdout[-20_000:] + run.stderr[-5_000:]
    assert run.returncode == 0, report
    # Not a pass by default: the stateful phase followed POST -> GET/DELETE links.
    covered = re.search(r"API Links:\s+(\d+) covered", run.stdout)
    assert covered and int(covered[1]) > 0, report


def test_job_body_has_one_variant_per_model(keyed_api: httpx.Client, client: Client) -> None:
    spec = keyed_api.get("/openapi.json").json()
    body = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]
    variants = {v["properties"]["model"]["const"]: v for v in body["schema"]["oneOf"]}
    assert set(variants) == set(client.registry.models)
    assert variants["tiny-sentiment"]["properties"]["inputs"]["items"]["type"] == "string"
    assert variants["tiny-zeroshot"]["properties"]["params"]["required"] == ["candidate_labels"]
    assert "params" in variants["tiny-zeroshot"]["required"]


@pytest.mark.parametrize("seed", range(3))
def test_labels_pattern_is_the_params_rule(seed: int) -> None:
    """The schema's pattern for zero-shot labels given as one string accepts exactly what
    config/params.py does: 1 to 100 labels, each at most 200 characters once stripped."""
    labels, longest = re.compile(LABELS_PATTERN), MAX_LABELS * (MAX_LABEL_CHARS + 1)
    rnd = random.Random(seed)
    for _ in range(400):
        parts = [
            "".join(rnd.choice("ab ,\x1c\u3000\ufeff\x85") for _ in range(rnd.choice([0, 1, 5])))
            + "x" * rnd.choice([0, 1, 198, 199, 200, 201])
            for _ in range(rnd.choice([0, 1, 2, 99, 100, 101]))
        ]
        text = ",".join(parts) or " "
        try:
            ZeroShotParams.model_validate({"candidate_labels": text})
            accepted = True
        except ValidationError:
            accepted = False
        assert accepted == (len(text) <= longest and bool(labels.search(text))), text
