"""Commands that run pipeq's services: worker, api, up, demo, flower, gradio."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from pipeq.config.settings import Settings


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


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeq.cli.demo import run_demo, write_demo_registry

    if args.write_registry:
        print(write_demo_registry(Path(args.write_registry).resolve()))
        return 0
    return run_demo(Settings())


def add_service_commands(commands: Any) -> None:
    """Add this module's commands to `pipeq`'s subparsers."""
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
    api.add_argument("--host", default="127.0.0.1", help="address to serve on")
    api.add_argument("--port", type=int, default=8000, help="port to serve on")
    api.set_defaults(func=cmd_api)

    up = commands.add_parser("up", help="API + workers (+ Flower) on this machine")
    up.add_argument("--host", default="127.0.0.1", help="address the API serves on")
    up.add_argument("--port", type=int, default=8000, help="port the API serves on")
    up.add_argument("--gpus", default="auto", help="the workers' GPUs, as `pipeq worker --gpus`")
    up.set_defaults(func=cmd_up)

    demo = commands.add_parser("demo", help="serve demo models offline and submit sample jobs")
    demo.add_argument(
        "--write-registry",
        metavar="DIR",
        help="only build the demo models into DIR and write DIR/models.yaml (docker-compose.yml)",
    )
    demo.set_defaults(func=cmd_demo)

    flower = commands.add_parser("flower", help="Flower dashboard of pipeq's workers and jobs")
    flower.add_argument("--port", type=int, default=5555, help="port Flower serves on")
    flower.set_defaults(func=cmd_flower)

    gradio = commands.add_parser("gradio", help="a Gradio page for one model, run on the queue")
    gradio.add_argument("model", help="the model the page runs (`pipeq models`)")
    gradio.add_argument("--host", default="127.0.0.1", help="address to serve on")
    gradio.add_argument("--port", type=int, default=7860, help="port to serve on")
    gradio.set_defaults(func=cmd_gradio)
