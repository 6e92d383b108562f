"""`pipeq backfill` against the real queue and a real worker: every input accounted for exactly
once, across an interrupt (SIGINT) and a crash (SIGKILL) and their `--resume`; CSV, plain-list and
S3 manifests; S3 output; the in-flight limit; malformed lines reported, not fatal."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
import redis
from PIL import Image

from pipeq.config.settings import Settings
from pipeq.producer.backfill import backfill
from pipeq.producer.client import Client
from pipeq.producer.manifest import BadLine, Item, read_manifest

pytestmark = pytest.mark.usefixtures("session_worker")

MODEL = "tiny-sentiment"
WORDS = "the film was great but the plot felt slow and the ending cold yet the cast were kind"


def texts(count: int) -> list[str]:
    rng = np.random.default_rng(count)
    words = WORDS.split()
    return [" ".join(rng.choice(words, size=int(rng.integers(2, 25)))) for _ in range(count)]


def write_jsonl(path: Path, count: int) -> list[str]:
    ids = [f"doc-{i}" for i in range(count)]
    lines = [json.dumps({"id": i, "input": t}) for i, t in zip(ids, texts(count), strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return ids


def records(out: Path, stem: str) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for shard in sorted(out.glob(f"{stem}-*.jsonl"))
        for line in shard.read_text().splitlines()
    ]


def assert_exactly_once(out: Path, ids: list[str]) -> None:
    written = [r["id"] for r in records(out, "part")] + [r["id"] for r in records(out, "failed")]
    assert len(written) == len(set(written)), "an input was written twice"
    assert sorted(written) == sorted(ids)


def test_jsonl_manifest_every_input_once(client: Client, tmp_path: Path) -> None:
    """The issue's size: 20,000 inputs in bulk jobs of 200 (about 35 s on a loaded 2-core VM)."""
    ids = write_jsonl(tmp_path / "manifest.jsonl", 20_000)
    out = tmp_path / "out"
    summary = backfill(
        client,
        str(tmp_path / "manifest.jsonl"),
        MODEL,
        out=str(out),
        chunk=200,
        max_in_flight=10_000,
        show_progress=False,
    )
    assert_exactly_once(out, ids)
    assert (summary.succeeded, summary.failed, summary.complete) == (20_000, 0, True)
    done = records(out, "part")
    assert all({"label", "score"} == set(r["output"][0]) for r in done), done[0]
    # An output is what the same input gives as a job of its own.
    by_id = {r["id"]: r["output"] for r in done}
    direct = client.wait(client.submit(MODEL, [texts(20_000)[7]]))
    assert direct.outputs is not None
    assert by_id["doc-7"][0]["label"] == direct.outputs[0][0]["label"]
    assert by_id["doc-7"][0]["score"] == pytest.approx(direct.outputs[0][0]["score"], abs=1e-4)
    assert json.loads((out / "summary.json").read_text())["succeeded"] == 20_000
    # Collected jobs leave nothing behind in the result store.
    results = redis.Redis.from_url(client.settings.effective_result_url)
    assert not list(results.scan_iter("pipeq:job:bf-*"))


def test_max_in_flight_bounds_queued_and_running_inputs(client: Client, tmp_path: Path) -> None:
    ids = write_jsonl(tmp_path / "manifest.jsonl", 600)
    summary = backfill(
        client,
        str(tmp_path / "manifest.jsonl"),
        MODEL,
        out=str(tmp_path / "out"),
        chunk=10,
        max_in_flight=40,
        show_progress=False,
    )
    assert summary.complete
    assert summary.peak_in_flight == 40  # the limit was reached, and never passed
    assert_exactly_once(tmp_path / "out", ids)


def run_cli(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeq.cli", "backfill", *args],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def interrupt_midway(
    env: dict[str, str], manifest: Path, out: Path, sig: int
) -> subprocess.Popen[str]:
    proc = run_cli(
        env,
        str(manifest),
        "--model",
        MODEL,
        "--out",
        str(out),
        "--chunk",
        "10",
        "--max-in-flight",
        "60",
        "--json",
    )
    deadline = time.monotonic() + 60
    while sum(1 for _ in records(out, "part")) < 200:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(sig)
    proc.wait(30)
    return proc


def test_sigint_then_resume_finishes_without_redoing_work(
    worker_env: dict[str, str], client: Client, tmp_path: Path
) -> None:
    manifest, out = tmp_path / "manifest.jsonl", tmp_path / "out"
    ids = write_jsonl(manifest, 5_000)
    first = interrupt_midway(worker_env, manifest, out, signal.SIGINT)
    assert first.returncode == 130, first.communicate()
    stopped = json.loads((out / "summary.json").read_text())
    assert not stopped["complete"] and 200 <= stopped["succeeded"] < 5_000
    # Without --resume an existing output is refused.
    refused = run_cli(worker_env, str(manifest), "--model", MODEL, "--out", str(out))
    assert refused.wait(60) == 2 and "--resume" in refused.communicate()[1]

    resumed = backfill(
        client,
        str(manifest),
        MODEL,
        out=str(out),
        chunk=10,
        max_in_flight=60,
        resume=True,
        show_progress=False,
    )
    assert resumed.complete and resumed.skipped == stopped["succeeded"]
    assert_exactly_once(out, ids)
    # Each input was published once over the two runs: jobs in flight at the interrupt were
    # collected from their records, not run again.
    assert stopped["published"] + resumed.published == 5_000
    assert {p.name for p in out.glob("part-*")} == {"part-00000.jsonl", "part-00001.jsonl"}


def test_sigkill_then_resume_loses_and_repeats_nothing(
    worker_env: dict[str, str], client: Client, tmp_path: Path
) -> None:
    manifest, out = tmp_path / "manifest.jsonl", tmp_path / "out"
    ids = write_jsonl(manifest, 5_000)
    crashed = interrupt_midway(worker_env, manifest, out, signal.SIGKILL)
    assert crashed.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists()
    resumed = backfill(
        client,
        str(manifest),
        MODEL,
        out=str(out),
        chunk=10,
        max_in_flight=60,
        resume=True,
        show_progress=False,
    )
    assert resumed.complete and resumed.skipped >= 200
    assert_exactly_once(out, ids)


def test_csv_manifest_with_id_column(client: Client, tmp_path: Path) -> None:
    rows = texts(300)
    manifest = tmp_path / "reviews.csv"
    manifest.write_text(
        "id,review,stars\n" + "".join(f'r{i},"{t}, truly",{i % 5}\n' for i, t in enumerate(rows))
    )
    summary = backfill(
        client,
        str(manifest),
        MODEL,
        out=str(tmp_path / "out"),
        column="review",
        chunk=32,
        show_progress=False,
    )
    assert summary.complete and summary.succeeded == 300
    assert_exactly_once(tmp_path / "out", [f"r{i}" for i in range(300)])


def test_plain_list_manifest_ids_are_line_numbers(client: Client, tmp_path: Path) -> None:
    rows = texts(250)
    manifest = tmp_path / "texts.txt"
    manifest.write_text("\n".join(rows[:100]) + "\n\n" + "\n".join(rows[100:]) + "\n")
    summary = backfill(
        client, str(manifest), MODEL, out=str(tmp_path / "out"), chunk=25, show_progress=False
    )
    assert summary.complete and summary.succeeded == 250
    line_numbers = [str(n) for n in range(1, 101)] + [str(n) for n in range(102, 252)]
    assert_exactly_once(tmp_path / "out", line_numbers)


def test_bad_lines_and_bad_inputs_fail_alone(client: Client, tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.jsonl"
    lines = [json.dumps({"id": f"ok-{i}", "input": t}) for i, t in enumerate(texts(60))]
    lines[10] = '{"id": "cut", "input": "never clos'  # line 11: not JSON
    lines[20] = json.dumps({"id": "shape", "input": {"nope": 1}})  # line 21: not an input
    lines[30] = json.dumps({"id": "image", "input": {"url": "https://example.com/a.png"}})
    lines[40] = json.dumps("a bare string input")  # line 41: id is the line number
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    summary = backfill(client, str(manifest), MODEL, out=str(out), chunk=16, show_progress=False)
    assert summary.complete
    # The image reference is one the text model cannot take: refused as its line, as the API
    # would refuse it, not sent to fail in the worker.
    assert (summary.succeeded, summary.failed, summary.bad_lines) == (57, 3, 3)
    failed = {r["id"]: r for r in records(out, "failed")}
    assert failed["11"]["line"] == 11 and failed["11"]["error"]["type"] == "ManifestError"
    assert failed["shape"]["line"] == 21 and "not an input" in failed["shape"]["error"]["message"]
    assert failed["image"]["line"] == 31 and "takes a string" in failed["image"]["error"]["message"]
    assert "41" in {r["id"] for r in records(out, "part")}
    # The failed file is a manifest of its own: same ids, the inputs that can be retried.
    again = list(read_manifest(str(next(out.glob("failed-*.jsonl")))))
    assert [type(e) for e in again] == [BadLine] * 3


def test_chunk_over_the_in_flight_limit_is_refused(client: Client, tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_text('"x"\n')
    with pytest.raises(ValueError, match="--max-in-flight"):
        backfill(client, str(tmp_path / "m.jsonl"), MODEL, chunk=100, max_in_flight=50)


# --- S3 ------------------------------------------------------------------------------------------

S3_BROKER_DB = 11  # its own broker database: only the S3-aware worker below takes these jobs


@pytest.fixture(scope="module")
def s3_endpoint(s3_server: str) -> str:
    return s3_server


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_s3_listing_is_paginated(s3_endpoint: str) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="many")
    for i in range(1_050):
        s3.put_object(Bucket="many", Key=f"in/{i:04d}.png", Body=b"x")
    s3.put_object(Bucket="many", Key="other/skip.png", Body=b"x")
    entries = list(read_manifest("s3://many/in/", s3=s3))
    assert len(entries) == 1_050
    assert entries[-1] == Item("s3://many/in/1049.png", entries[-1].input)
    assert entries[-1].input.s3 == "s3://many/in/1049.png"  # type: ignore[union-attr]


def test_s3_manifest_to_s3_output(
    s3_endpoint: str, start_worker: Any, worker_env: dict[str, str], settings: Settings
) -> None:
    broker = worker_env["PIPEQ_BROKER_URL"].rsplit("/", 1)[0] + f"/{S3_BROKER_DB}"
    redis.Redis.from_url(broker).flushdb()
    s3_env = {
        "PIPEQ_BROKER_URL": broker,
        "PIPEQ_RESULT_URL": broker,
        "PIPEQ_S3_ENDPOINT_URL": s3_endpoint,
    }
    start_worker("--models", "tiny-vit", "--concurrency", "8", name="s3@%h", env=s3_env)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="photos")
    keys = [f"batch1/{i:03d}.png" for i in range(40)]
    for i, key in enumerate(keys):
        s3.put_object(Bucket="photos", Key=key, Body=png(i))
    s3.put_object(Bucket="photos", Key="batch1/broken.png", Body=b"not a png")
    own = Client(
        settings.model_copy(
            update={"broker_url": broker, "result_url": broker, "s3_endpoint_url": s3_endpoint}
        )
    )

    summary = backfill(
        own,
        "s3://photos/batch1/",
        "tiny-vit",
        {"top_k": 1},
        out="s3://photos/results",
        chunk=8,
        max_in_flight=16,
        show_progress=False,
    )
    assert summary.complete and (summary.succeeded, summary.failed) == (40, 1)
    listed = s3.list_objects_v2(Bucket="photos", Prefix="results/")["Contents"]
    assert {o["Key"] for o in listed} == {
        "results/part-00000.jsonl",
        "results/failed-00000.jsonl",
        "results/summary.json",
    }

    def lines(key: str) -> list[dict[str, Any]]:
        body = s3.get_object(Bucket="photos", Key=key)["Body"].read().decode()
        return [json.loads(line) for line in body.splitlines()]

    done = lines("results/part-00000.jsonl")
    assert sorted(r["id"] for r in done) == sorted(f"s3://photos/{k}" for k in keys)
    assert all(len(r["output"]) == 1 for r in done)
    [broken] = lines("results/failed-00000.jsonl")
    assert broken["id"] == "s3://photos/batch1/broken.png"
    assert broken["error"]["type"] == "DecodeError"
    # Resuming a finished S3 output does nothing more.
    again = backfill(
        own,
        "s3://photos/batch1/",
        "tiny-vit",
        {"top_k": 1},
        out="s3://photos/results",
        chunk=8,
        max_in_flight=16,
        resume=True,
        show_progress=False,
    )
    assert (again.skipped, again.jobs, again.complete) == (41, 0, True)


def test_input_its_model_cannot_take_is_a_bad_line(client: Client, tmp_path: Path) -> None:
    """The message the API gives a document sent to a text model, on the line that holds it."""
    manifest = tmp_path / "manifest.jsonl"
    document = {"image": {"url": "https://example.com/a.png"}, "question": "total?"}
    manifest.write_text(json.dumps({"id": "doc", "input": document}) + "\n")
    out = tmp_path / "out"
    summary = backfill(client, str(manifest), MODEL, out=str(out), chunk=16, show_progress=False)
    assert (summary.bad_lines, summary.jobs) == (1, 0)
    [failed] = records(out, "failed")
    assert failed["id"] == "doc" and failed["line"] == 1
    assert failed["error"]["message"] == (
        f"line 1: the input is a document; {MODEL} (text-classification) takes a string"
    )


def test_unattended_run_logs_progress_and_resumed_totals_add_up(
    worker_env: dict[str, str], tmp_path: Path
) -> None:
    """A backfill whose stderr is no terminal (cron, a pod) logs its progress; a resumed run's
    summary.json holds the totals of every run into the output, bad lines included."""
    manifest = tmp_path / "manifest.jsonl"
    lines = [json.dumps({"id": f"doc-{i}", "input": t}) for i, t in enumerate(texts(40))]
    lines[3] = json.dumps({"id": "bad-1", "input": {"nope": 1}})
    lines[7] = json.dumps({"id": "bad-2", "input": {"nope": 2}})
    manifest.write_text("\n".join(lines[:30]) + "\n")
    out = tmp_path / "out"
    first = run_cli(worker_env, str(manifest), "--model", MODEL, "--out", str(out))
    _, stderr = first.communicate(timeout=240)
    assert first.returncode == 0, stderr[-2000:]
    assert re.search(r"backfill: \d+ of 30 done, \d+ failed, \d+ inputs/s, ETA ", stderr), stderr
    manifest.write_text("\n".join(lines) + "\n")  # ten more lines since
    again = run_cli(worker_env, str(manifest), "--model", MODEL, "--out", str(out), "--resume")
    _, stderr = again.communicate(timeout=240)
    assert again.returncode == 0, stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["succeeded"], summary["failed"], summary["skipped"]) == (10, 0, 30)
    assert (summary["total_succeeded"], summary["total_failed"]) == (38, 2)


def test_missing_manifest_creates_nothing(worker_env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = run_cli(worker_env, str(tmp_path / "nope.jsonl"), "--model", MODEL, "--out", str(out))
    _, stderr = done.communicate(timeout=120)
    assert done.returncode != 0
    assert "no manifest at" in stderr and str(tmp_path / "nope.jsonl") in stderr
    assert not out.exists()
