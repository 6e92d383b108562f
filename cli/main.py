"""The `pipeq` command. Worker-side commands import torch lazily, so a producer-only install
can still run `pipeq submit`, `pipeq api` and `pipeq models`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from pydantic import ValidationError

from pipeq.config.errors import PipeqError
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


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    from pipeq.producer.api import create_app

    uvicorn.run(create_app(), host=args.host, port=args.port, log_level="info")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from pipeq.worker.launch import plan_workers, supervise, visible_gpus

    settings = Settings()
    models = args.models.split(",") if args.models else None
    if args.role == "forward":
        from pipeq.worker.forward_server import serve_forward

        return serve_forward(settings, models, args.socket)
    if args.role == "front":
        from pipeq.worker.serve import serve

        return serve(
            settings, models, args.name, args.concurrency, settings.metrics_port, args.socket
        )
    plans = plan_workers(args.gpus, visible_gpus(dict(os.environ)), args.name, args.procs_per_gpu)
    return supervise(plans, _worker_argv(args), settings.metrics_port)


def _procs(value: str) -> int | None:
    if value == "auto":
        return None
    count = int(value)
    if count < 1:
        raise argparse.ArgumentTypeError("at least 1, or auto")
    return count


def _worker_argv(args: argparse.Namespace) -> list[str]:
    argv = ["--concurrency", str(args.concurrency)]
    return argv + (["--models", args.models] if args.models else [])


def cmd_up(args: argparse.Namespace) -> int:
    from pipeq.cli.up import run_up

    return run_up(Settings(), args.host, args.port, args.gpus)


def cmd_flower(args: argparse.Namespace) -> int:
    from pipeq.cli.flower import run_flower

    return run_flower(Settings(), args.port)


def cmd_gradio(args: argparse.Namespace) -> int:
    from pipeq.producer.client import Client
    from pipeq.producer.gradio_app import launch_page

    launch_page(Client(), args.model, args.host, args.port)
    return 0


def cmd_demo(_: argparse.Namespace) -> int:
    from pipeq.cli.demo import run_demo

    return run_demo(Settings())


def cmd_webhooks_worker(args: argparse.Namespace) -> int:
    from pipeq.worker.callbacks import serve_webhooks

    return serve_webhooks(Settings(), args.concurrency)


def cmd_webhooks_failed(_: argparse.Namespace) -> int:
    from pipeq.core.webhooks import DeadLetters

    for letter in DeadLetters(Settings().effective_result_url).list():
        delivery = letter.delivery
        print(
            json.dumps(
                {
                    "id": delivery.id,
                    "event": delivery.event,
                    "url": delivery.url,
                    "attempts": letter.attempts,
                    "error": letter.error,
                    "failed_at": letter.failed_at,
                }
            )
        )
    return 0


def cmd_webhooks_replay(args: argparse.Namespace) -> int:
    from pipeq.config.celery import make_celery
    from pipeq.core.webhooks import DeadLetters

    settings = Settings()
    dead, celery = DeadLetters(settings.effective_result_url), make_celery(settings)
    for webhook_id in args.ids:
        delivery = dead.replay(celery, webhook_id)
        print(f"replaying {delivery.id} -> {delivery.url}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeq", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    worker = commands.add_parser("worker", help="run GPU-pinned workers")
    worker.add_argument(
        "--gpus",
        default="auto",
        help="auto, cpu, or indices like 0,1 (an engine each); 0+1: one engine over both, for "
        "a model with device_map: auto",
    )
    worker.add_argument("--models", help="comma-separated model names (default: all)")
    worker.add_argument("--concurrency", type=int, default=64, help="jobs in flight per worker")
    worker.add_argument(
        "--procs-per-gpu",
        type=_procs,
        default=None,
        metavar="N|auto",
        help="front processes per GPU (Celery consumers feeding its one forward process); "
        "default auto: the cores per GPU less two, one on the CPU",
    )
    worker.add_argument("--name", help="worker hostname template (default gpuN@%%h / cpu@%%h)")
    # The supervisor's own children: one forward process per GPU and its fronts.
    worker.add_argument("--role", choices=["front", "forward"], help=argparse.SUPPRESS)
    worker.add_argument("--socket", help=argparse.SUPPRESS)
    worker.set_defaults(func=cmd_worker)

    api = commands.add_parser("api", help="serve the HTTP API")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.set_defaults(func=cmd_api)

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

    up = commands.add_parser("up", help="API + workers (+ Flower) on this machine")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--gpus", default="auto")
    up.set_defaults(func=cmd_up)

    demo = commands.add_parser("demo", help="serve demo models offline and submit sample jobs")
    demo.set_defaults(func=cmd_demo)

    webhooks = commands.add_parser("webhooks", help="webhook delivery and its dead letters")
    hooks = webhooks.add_subparsers(dest="webhooks_command", required=True)
    hooks_worker = hooks.add_parser("worker", help="deliver webhooks (queue pipeq.webhooks)")
    hooks_worker.add_argument("--concurrency", type=int, default=32, help="deliveries in flight")
    hooks_worker.set_defaults(func=cmd_webhooks_worker)
    failed = hooks.add_parser("failed", help="list dead-lettered webhooks, one JSON per line")
    failed.set_defaults(func=cmd_webhooks_failed)
    replay = hooks.add_parser("replay", help="deliver dead-lettered webhooks again")
    replay.add_argument("ids", nargs="+", metavar="ID", help="webhook-id, as `failed` lists it")
    replay.set_defaults(func=cmd_webhooks_replay)

    flower = commands.add_parser("flower", help="Flower dashboard of pipeq's workers and jobs")
    flower.add_argument("--port", type=int, default=5555)
    flower.set_defaults(func=cmd_flower)

    gradio = commands.add_parser("gradio", help="a Gradio page for one model, run on the queue")
    gradio.add_argument("model")
    gradio.add_argument("--host", default="127.0.0.1")
    gradio.add_argument("--port", type=int, default=7860)
    gradio.set_defaults(func=cmd_gradio)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args))
    except PipeqError as exc:
        print(f"pipeq: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"pipeq: invalid settings (PIPEQ_* environment): {exc}", file=sys.stderr)
        return 2
