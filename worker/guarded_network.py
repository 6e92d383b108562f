"""httpcore's network backend for user URLs: every connection's address checked as it is opened
(no DNS rebinding between check and connect), and every read bounded by the fetch's deadline."""

from __future__ import annotations

import math
import ssl
import typing
from collections.abc import Iterable

import httpcore
import httpx

from pipeq.config.errors import FetchFailed, UnsafeReference
from pipeq.core.urlguard import Resolver, refuse_private, system_resolve, time_left


class GuardedBackend(httpcore.NetworkBackend):
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
                refuse_private(address, host)
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
    backend = GuardedBackend(allow_private, resolve or system_resolve)
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
