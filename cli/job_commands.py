"""Commands that submit and read jobs: submit, backfill, models."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pipeq.config.settings import Settings
from pipeq.producer.manifest import parse_input


def parse_param(pair: str) -> tuple[str, Any]:
    """`k=v`, where v is read as JSON if it parses (`top_k=2` is the number 2), else a string."""
    key, sep, raw = pair.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--param takes key=value, got {pair!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def cmd_submit(args: argparse.Namespace) -> int:
    from pipeq.producer.client import Client

    client = Client()
    job_id = client.submit(
        args.model,
        [parse_input(text) for text in args.inputs],
        dict(args.param),
        priority=args.priority,
        id=args.id,
    )
    doc = client.wait(job_id, args.wait) if args.wait else client.get(job_id)
    print(doc.model_dump_json(indent=2))
    return 0 if doc.status in ("queued", "running", "succeeded") else 1


def cmd_backfill(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from pipeq.producer.backfill import backfill
    from pipeq.producer.client import Client

    try:
        summary = backfill(
            Client(),
            args.manifest,
            args.model,
            args.params,
            args.out,
            args.chunk,
            args.max_in_flight,
            args.resume,
            column=args.column,
            manifest_format=args.format,
            show_progress=not args.json,
        )
    except (ValueError, OSError) as exc:
        print(f"pipeq backfill: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(asdict(summary)))
    else:
        state = "done" if summary.complete else "interrupted (finish with --resume)"
        print(
            f"{state}: {summary.succeeded:,} succeeded, {summary.failed:,} failed, "
            f"{summary.skipped:,} skipped, {summary.inputs_per_s:,.0f} inputs/s -> {summary.out}",
            file=sys.stderr,
        )
    return 0 if summary.complete else 130


def _json_object(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("--params takes a JSON object")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be at least 1, got {value}")
    return value


def cmd_models(_: argparse.Namespace) -> int:
    from pipeq.config.registry import load_registry

    registry = load_registry(Settings().models)
    print(json.dumps({name: spec.public() for name, spec in registry.models.items()}, indent=2))
    return 0


def add_job_commands(commands: Any) -> None:
    """Add this module's commands to `pipeq`'s subparsers."""
    submit = commands.add_parser("submit", help="submit one job and print its record")
    submit.add_argument("model")
    submit.add_argument("inputs", nargs="+", metavar="INPUT")
    submit.add_argument("--param", type=parse_param, action="append", default=[])
    submit.add_argument("--wait", type=float, default=0, metavar="SECONDS")
    submit.add_argument("--priority", choices=["interactive", "bulk"], default="interactive")
    submit.add_argument("--id", help="idempotency key")
    submit.set_defaults(func=cmd_submit)

    backfill = commands.add_parser(
        "backfill", help="run a manifest through the bulk lane into JSONL shards (resumable)"
    )
    backfill.add_argument("manifest", help="JSONL, CSV, a plain list, or s3://bucket/prefix/")
    backfill.add_argument("--model", required=True)
    backfill.add_argument("--params", type=_json_object, default={}, metavar="JSON")
    backfill.add_argument("--out", help="DIR or s3://bucket/prefix (default: ./NAME-results)")
    backfill.add_argument("--chunk", type=_positive, default=100, help="inputs per bulk job")
    backfill.add_argument(
        "--max-in-flight",
        type=_positive,
        default=10_000,
        metavar="N",
        help="most inputs queued or running at once",
    )
    backfill.add_argument("--resume", action="store_true", help="skip ids already in --out")
    backfill.add_argument("--column", help="the CSV column holding the inputs")
    backfill.add_argument(
        "--format",
        choices=["jsonl", "csv", "list"],
        help="manifest format (default: from the file's extension)",
    )
    backfill.add_argument(
        "--json", action="store_true", help="no progress bar; print the summary as JSON"
    )
    backfill.set_defaults(func=cmd_backfill)

    models = commands.add_parser("models", help="print the model registry as loaded")
    models.set_defaults(func=cmd_models)
