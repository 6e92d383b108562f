"""The `pipeq` command. Worker-side commands import torch lazily, so a producer-only install
can still run `pipeq submit`, `pipeq api` and `pipeq models`."""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

from pipeq.cli.job_commands import add_job_commands
from pipeq.cli.service_commands import add_service_commands
from pipeq.cli.webhook_commands import add_webhook_commands
from pipeq.config.errors import PipeqError
from pipeq.config.settings import Settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeq", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    add_service_commands(commands)
    add_job_commands(commands)
    add_webhook_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        Settings()  # every command stops here on an invalid or unknown PIPEQ_* variable
        return int(args.func(args))
    except PipeqError as exc:
        print(f"pipeq: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"pipeq: invalid settings (PIPEQ_* environment): {exc}", file=sys.stderr)
        return 2
