"""Commands of bulk work and the registry: backfill, models."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pipeq.config.settings import Settings


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
    backfill = commands.add_parser(
        "backfill", help="run a manifest through the bulk lane into JSONL shards (resumable)"
    )
    backfill.add_argument("manifest", help="JSONL, CSV, a plain list, or s3://bucket/prefix/")
    backfill.add_argument("--model", required=True, help="a model of the registry")
    backfill.add_argument(
        "--params", type=_json_object, default={}, metavar="JSON", help="call params of every job"
    )
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
