"""How a worker reaches a URL: http(s) only, public addresses only (SSRF), within a deadline.

`checked_url` refuses what needs no lookup: a scheme other than http(s), no host, a host that is
a non-public IP literal. `guarded_client` makes the httpx client that media fetching and webhook
delivery use. Its transport resolves each host once, refuses it if any of its addresses is
private, loopback, link-local, multicast, reserved or unspecified (looking through IPv4-mapped,
6to4 and NAT64 IPv6), and connects to an address it checked. httpx would otherwise resolve the
name again, and a DNS answer that changes between the two lookups (rebinding) would send the
request to an address nobody checked. The Host header, TLS SNI and certificate check still use
the name, which httpcore takes from the URL, not from the address connected to.

Under `deadline(seconds)`, every connect, TLS handshake, read and write that thread makes through
a guarded client waits at most what is left of it: httpx's timeouts are per socket operation, so
a server that sends one header line now and then would otherwise hold a request without end.
"""

from __future__ import annotations

import ipaddress
import math
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import httpx

from pipeq.config.errors import FetchFailed, UnsafeReference

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[IPAddress]]

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Monotonic time by which the current thread's requests must be done; None: only httpx's timeouts.
_deadline: ContextVar[float | None] = ContextVar("pipeq_http_deadline", default=None)


def checked_url(url: httpx.URL, allow_private: bool) -> httpx.URL:
    """`url` if it is http(s), names a host, and that host is not a non-public IP literal.

    A host name is checked when a guarded client connects to it, on the addresses it connects to.
    """
    if url.scheme not in ("http", "https"):
        raise UnsafeReference(f"only http:// and https:// URLs are fetched, not {url}")
    if not url.host:
        raise UnsafeReference(f"{url} names no host")
    if not allow_private:
        try:
            literal = _parse_ip(url.host)
        except ValueError:
            return url
        refuse_private(literal, url.host)
    return url


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Bound every socket operation of this thread's guarded requests to `seconds` from now.

    When it passes, the operation under way fails with httpx's timeout for it (ConnectTimeout,
    ReadTimeout, ...). A deadline inside another never extends it.
    """
    until = time.monotonic() + seconds
    outer = _deadline.get()
    token = _deadline.set(until if outer is None else min(outer, until))
    try:
        yield
    finally:
        _deadline.reset(token)


def time_left() -> float:
    """Seconds left before this thread's `deadline`; infinite outside one."""
    until = _deadline.get()
    return math.inf if until is None else until - time.monotonic()


def is_public(address: IPAddress) -> bool:
    """True for an address that routes to the public internet, looking through IPv6 wrappers."""
    if isinstance(address, ipaddress.IPv6Address):
        # ::ffff:a.b.c.d, 2002:: (6to4) and 64:ff9b:: (NAT64) all reach an IPv4 host.
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public(embedded)
        if address.is_site_local:
            return False
    return address.is_global and not (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


def system_resolve(host: str, port: int) -> list[IPAddress]:
    """The addresses the system resolver gives for `host`, in its order, without repeats."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise FetchFailed(f"cannot resolve {host}: {exc}") from exc
    return list(dict.fromkeys(_parse_ip(str(info[4][0])) for info in infos))


def _parse_ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text.partition("%")[0])  # drop an IPv6 zone id (fe80::1%eth0)


def refuse_private(address: IPAddress, host: str) -> None:
    if not is_public(address):
        raise UnsafeReference(
            f"{host} is {address}, a private or reserved address; pipeq fetches only public "
            "addresses unless PIPEQ_ALLOW_PRIVATE_URLS=true"
        )
