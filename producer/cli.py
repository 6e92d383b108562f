"""The `pipeq` command. Worker-side commands import torch lazily, so a producer-only install
can still run `pipeq submit`, `pipeq api` and `pipeq models`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from config.errors import PipeqError
from config.settings import Settings


def parse_input(text: str) -> Any:
    """A CLI input: a JSON object as given, a URL or s3:// URI, an existing file, else text."""
    if text.startswith("{"):
        return json.loads(text)
    if text.startswith(("http://", "https://")):
        return {"url": text}
    if text.startswith("s3://"):
        return {"s3": text}
    if os.path.exists(text):
        return {"path": str(Path(text).resolve())}
    return text


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
    from producer.client import Client

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


def cmd_models(_: argparse.Namespace) -> int:
    from config.registry import load_registry

    registry = load_registry(Settings().models)
    print(json.dumps({name: spec.public() for name, spec in registry.models.items()}, indent=2))
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    from producer.api import create_app

    uvicorn.run(create_app(), host=args.host, port=args.port, log_level="info")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.launch import plan_workers, supervise, visible_gpus

    plans = plan_workers(args.gpus, visible_gpus(dict(os.environ)), args.name)
    if len(plans) > 1:
        return supervise(plans, _worker_argv(args))
    (plan,) = plans
    if plan.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = plan.gpu
    else:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    from worker.serve import serve

    settings = Settings()
    models = args.models.split(",") if args.models else None
    port = settings.metrics_port and settings.metrics_port + int(plan.gpu or 0)
    return serve(settings, models, plan.hostname, args.concurrency, port)


def _worker_argv(args: argparse.Namespace) -> list[str]:
    argv = ["--concurrency", str(args.concurrency)]
    return argv + (["--models", args.models] if args.models else [])


def cmd_up(args: argparse.Namespace) -> int:
    from producer.up import run_up

    return run_up(Settings(), args.host, args.port, args.gpus)


def cmd_demo(_: argparse.Namespace) -> int:
    from worker.demo import run_demo

    return run_demo(Settings())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeq", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    worker = commands.add_parser("worker", help="run GPU-pinned workers")
    worker.add_argument("--gpus", default="auto", help="auto, cpu, or indices like 0,1")
    worker.add_argument("--models", help="comma-separated model names (default: all)")
    worker.add_argument("--concurrency", type=int, default=64, help="jobs in flight per worker")
    worker.add_argument("--name", help="worker hostname template (default gpuN@%%h / cpu@%%h)")
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

    models = commands.add_parser("models", help="print the model registry as loaded")
    models.set_defaults(func=cmd_models)

    up = commands.add_parser("up", help="API + workers (+ Flower) on this machine")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--gpus", default="auto")
    up.set_defaults(func=cmd_up)

    demo = commands.add_parser("demo", help="serve demo models offline and submit sample jobs")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except PipeqError as exc:
        print(f"pipeq: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
