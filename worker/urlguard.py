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
import ssl
import time
import typing
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import httpcore
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
        _refuse_private(literal, url.host)
    return url


def guarded_client(
    timeout_s: float,
    allow_private: bool,
    *,
    limits: httpx.Limits | None = None,
    resolve: Resolver | None = None,
) -> httpx.Client:
    """An httpx client that connects only to checked addresses and honours `deadline`.

    No redirects (callers check each hop), no proxy or certificate settings from the environment
    (a proxy would be the peer, and would resolve the name itself). `resolve` defaults to the
    system resolver.
    """
    limits = limits or httpx.Limits()
    backend = _GuardedBackend(allow_private, resolve or system_resolve)
    # httpx's transport takes no network backend; give it a pool built as httpx builds its own,
    # plus ours. Everything else (exception mapping, streaming) stays httpx's.
    transport = httpx.HTTPTransport(limits=limits, trust_env=False)
    transport._pool = httpcore.ConnectionPool(
        ssl_context=httpx.create_ssl_context(trust_env=False),
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=backend,
    )
    return httpx.Client(
        transport=transport,
        timeout=httpx.Timeout(timeout_s),
        follow_redirects=False,
        trust_env=False,
    )


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


class _GuardedBackend(httpcore.NetworkBackend):
    """httpcore's socket backend, connecting to the addresses it resolved and checked itself."""

    def __init__(self, allow_private: bool, resolve: Resolver) -> None:
        self._allow_private = allow_private
        self._resolve = resolve
        self._sockets = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        addresses = self._resolve(host, port)
        if not addresses:
            raise FetchFailed(f"{host} resolves to no address")
        if not self._allow_private:
            for address in addresses:  # all of them: which one answers is not ours to choose
                _refuse_private(address, host)
        failure: httpcore.ConnectError | None = None
        for address in addresses:
            try:
                stream = self._sockets.connect_tcp(
                    str(address),
                    port,
                    _bounded(timeout, httpcore.ConnectTimeout),
                    local_address,
                    socket_options,
                )
            except httpcore.ConnectError as exc:  # try the next address, as create_connection does
                failure = exc
                continue
            return _DeadlineStream(stream)
        assert failure is not None
        raise failure

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        raise UnsafeReference("pipeq does not fetch over unix sockets")


class _DeadlineStream(httpcore.NetworkStream):
    """A socket stream whose every operation also ends at the thread's `deadline`."""

    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _bounded(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _bounded(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        timeout = _bounded(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> typing.Any:
        return self._stream.get_extra_info(info)


def _bounded(timeout: float | None, expired: type[httpcore.TimeoutException]) -> float | None:
    left = time_left()
    if left == math.inf:
        return timeout
    if left <= 0:
        # Not settimeout(0): that would make the socket non-blocking, not time it out.
        raise expired("the request's deadline has passed")
    return left if timeout is None else min(timeout, left)


def _parse_ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text.partition("%")[0])  # drop an IPv6 zone id (fe80::1%eth0)


def _refuse_private(address: IPAddress, host: str) -> None:
    if not is_public(address):
        raise UnsafeReference(
            f"{host} is {address}, a private or reserved address; pipeq fetches only public "
            "addresses unless PIPEQ_ALLOW_PRIVATE_URLS=true"
        )
