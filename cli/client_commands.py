"""Commands a web team runs against a service: submit, get, cancel. Over the HTTP API when a URL
is given (`--url`, PIPEQ_API_URL, with PIPEQ_API_KEY); else straight to the broker and record
store, as the service's own hosts do."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pipeq.cli.local_inputs import cli_input
from pipeq.config.errors import JobConflict
from pipeq.config.settings import Settings
from pipeq.core.jobs import JobDocument
from pipeq.producer.client import Client
from pipeq.producer.http_client import HttpClient

OK = ("queued", "running", "succeeded")


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
    client = _client(args.url)
    inputs = [cli_input(text, args.server_path) for text in args.inputs]
    job_id = client.submit(args.model, inputs, dict(args.param), priority=args.priority, id=args.id)
    return _show(client, job_id, args.wait)


def cmd_get(args: argparse.Namespace) -> int:
    return _show(_client(args.url), args.id, args.wait)


def cmd_cancel(args: argparse.Namespace) -> int:
    client = _client(args.url)
    if isinstance(client, HttpClient):
        doc = client.cancel(args.id)
    else:
        doc, cancelled = client.cancel(args.id)
        if not cancelled:
            raise JobConflict(f"job {args.id} is {doc.status}; only queued jobs can be cancelled")
    print(doc.model_dump_json(indent=2))
    return 0


def _client(url: str | None) -> Client | HttpClient:
    settings = Settings()
    url = url or settings.api_url
    return HttpClient(url, settings.api_key) if url else Client(settings)


def _show(client: Client | HttpClient, job_id: str, wait_s: float) -> int:
    """Print the job's record (once done, with `wait_s`); non-zero when it failed, or is still
    not done when the wait ran out."""
    doc: JobDocument = client.wait(job_id, wait_s) if wait_s else client.get(job_id)
    print(doc.model_dump_json(indent=2))
    if wait_s and not doc.done:
        print(f"pipeq: job {job_id} is still {doc.status} after {wait_s:g} s", file=sys.stderr)
        return 1
    return 0 if doc.status in OK else 1


def add_client_commands(commands: Any) -> None:
    """Add this module's commands to `pipeq`'s subparsers."""
    submit = commands.add_parser("submit", help="submit one job and print its record")
    submit.add_argument("model", help="a model of the registry (`pipeq models`)")
    submit.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="text, a URL, s3://bucket/key, a local file (sent inline) or a JSON input object",
    )
    submit.add_argument(
        "--param",
        type=parse_param,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a call param (VALUE read as JSON where it parses); repeatable",
    )
    submit.add_argument(
        "--server-path",
        action="store_true",
        help="send local files as paths for the worker to read (PIPEQ_MEDIA_ROOTS), not inline",
    )
    submit.add_argument(
        "--priority", choices=["interactive", "bulk"], default="interactive", help="lane"
    )
    submit.add_argument("--id", help="idempotency key: submitting it again returns the same job")
    _add_common(submit)
    submit.set_defaults(func=cmd_submit)

    get = commands.add_parser("get", help="print a job's record")
    get.add_argument("id", help="the job's id")
    _add_common(get)
    get.set_defaults(func=cmd_get)

    cancel = commands.add_parser("cancel", help="cancel a queued job and print its record")
    cancel.add_argument("id", help="the job's id")
    cancel.add_argument("--url", help="the HTTP API (default: PIPEQ_API_URL, else the broker)")
    cancel.set_defaults(func=cmd_cancel, wait=0)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--wait", type=float, default=0, metavar="SECONDS", help="wait up to this long for the job"
    )
    parser.add_argument("--url", help="the HTTP API (default: PIPEQ_API_URL, else the broker)")
