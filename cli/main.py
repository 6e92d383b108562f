"""The `pipeq` command. Worker-side commands import torch lazily, so a producer-only install
can still run `pipeq submit`, `pipeq api` and `pipeq models`."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import version
from typing import Any

from kombu.exceptions import OperationalError
from pydantic import ValidationError
from redis.exceptions import RedisError

from pipeq.cli.client_commands import add_client_commands
from pipeq.cli.job_commands import add_job_commands
from pipeq.cli.service_commands import add_service_commands
from pipeq.cli.webhook_commands import add_webhook_commands
from pipeq.config.errors import PipeqError
from pipeq.config.settings import Settings


class _Help(argparse.HelpFormatter):
    """Each option's help ends with its default, where it has one worth saying."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        quiet = action.default in (None, False, [], argparse.SUPPRESS) or "default" in text
        return text if quiet or not action.option_strings else f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(**kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeq", description=__doc__)
    parser.add_argument("--version", action="version", version=f"pipeq {version('pipeq')}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_service_commands(commands)
    add_client_commands(commands)
    add_job_commands(commands)
    add_webhook_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request is noise here
    try:
        Settings()  # every command stops here on an invalid or unknown PIPEQ_* variable
        return int(args.func(args))
    except PipeqError as exc:
        print(f"pipeq: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"pipeq: invalid settings (PIPEQ_* environment): {exc}", file=sys.stderr)
        return 2
    except (OperationalError, RedisError) as exc:
        print(f"pipeq: the broker or record store cannot be reached: {exc}", file=sys.stderr)
        return 2
