"""Webhook URLs at submit: refused when the SSRF rule would refuse their delivery."""

from __future__ import annotations

import httpx

from pipeq.config.errors import FetchFailed, UnsafeReference
from pipeq.core.urlguard import checked_url, is_public, system_resolve


def refused_webhook(url: str) -> str | None:
    """Why a webhook URL is refused at submit, or None: what `checked_url` refuses, and a name
    that resolves to a non-public address now (a name that does not resolve is left to the
    delivery, which checks again on the address it connects to)."""
    try:
        parsed = checked_url(httpx.URL(url), allow_private=False)
    except (UnsafeReference, httpx.InvalidURL) as exc:
        return str(exc)
    try:
        addresses = system_resolve(parsed.host, parsed.port or 443)
    except FetchFailed:
        return None
    private = [address for address in addresses if not is_public(address)]
    if private:
        return (
            f"{parsed.host} is {private[0]}, a private or reserved address; webhooks go only to "
            "public addresses unless PIPEQ_ALLOW_PRIVATE_URLS=true"
        )
    return None
