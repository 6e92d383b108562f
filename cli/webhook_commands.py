"""Commands of webhook delivery: its worker, and the dead letters an operator lists and replays."""

from __future__ import annotations

import argparse
import json
from typing import Any

from pipeq.config.errors import InvalidInput
from pipeq.config.settings import Settings
from pipeq.core.webhook_urls import refused_webhook


def cmd_webhooks_worker(args: argparse.Namespace) -> int:
    from pipeq.worker.webhook_service import serve_webhooks

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
    if args.url and not settings.allow_private_urls and (why := refused_webhook(args.url)):
        raise InvalidInput(f"--url: {why}")
    dead, celery = DeadLetters(settings.effective_result_url), make_celery(settings)
    for webhook_id in args.ids:
        delivery = dead.replay(celery, webhook_id, args.url)
        print(f"replaying {delivery.id} -> {delivery.url}")
    return 0


def add_webhook_commands(commands: Any) -> None:
    """Add this module's commands to `pipeq`'s subparsers."""
    webhooks = commands.add_parser("webhooks", help="webhook delivery and its dead letters")
    hooks = webhooks.add_subparsers(dest="webhooks_command", required=True)
    hooks_worker = hooks.add_parser("worker", help="deliver webhooks (queue pipeq.webhooks)")
    hooks_worker.add_argument("--concurrency", type=int, default=32, help="deliveries in flight")
    hooks_worker.set_defaults(func=cmd_webhooks_worker)
    failed = hooks.add_parser("failed", help="list dead-lettered webhooks, one JSON per line")
    failed.set_defaults(func=cmd_webhooks_failed)
    replay = hooks.add_parser("replay", help="deliver dead-lettered webhooks again")
    replay.add_argument("ids", nargs="+", metavar="ID", help="webhook-id, as `failed` lists it")
    replay.add_argument("--url", help="deliver to this URL instead of the job's own")
    replay.set_defaults(func=cmd_webhooks_replay)
