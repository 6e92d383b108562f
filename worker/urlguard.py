"""Which URLs a worker may fetch: http(s) only, and only hosts on public addresses (SSRF guard).

Two checks, because one DNS answer may differ from the next: `checked_url` resolves the host
before any request and refuses it if any address is private, loopback, link-local, multicast,
reserved or unspecified (looking through IPv4-mapped, 6to4 and NAT64 IPv6); `check_peer` then
refuses a response whose connection actually reached such an address, before its body is read.
Media fetching and webhook delivery both call them on every redirect hop.
"""

from __future__ import annotations

import ipaddress
import socket

import httpx

from config.errors import FetchFailed, UnsafeReference

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def checked_url(url: httpx.URL, allow_private: bool) -> httpx.URL:
    """`url` if it is http(s) and its host resolves only to public addresses."""
    if url.scheme not in ("http", "https"):
        raise UnsafeReference(f"only http:// and https:// URLs are fetched, not {url}")
    if not url.host:
        raise UnsafeReference(f"{url} names no host")
    if not allow_private:
        host = url.raw_host.decode("ascii")
        for address in _resolve(host, url.port or (443 if url.scheme == "https" else 80)):
            _refuse_private(address, host)
    return url


def check_peer(response: httpx.Response) -> None:
    """Refuse a response whose connection reached a non-public address."""
    stream = response.extensions.get("network_stream")
    if stream is None:
        return  # a transport without sockets (httpx.MockTransport): the pre-check stands alone
    peer = stream.get_extra_info("server_addr")
    try:
        address = _parse_ip(str(peer[0]))
    except (TypeError, ValueError) as exc:  # no address, or a unix socket path
        raise UnsafeReference(f"could not confirm which address {response.url.host} is") from exc
    _refuse_private(address, response.url.host)


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


def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise FetchFailed(f"cannot resolve {host}: {exc}") from exc
    return [_parse_ip(str(info[4][0])) for info in infos]


def _parse_ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text.partition("%")[0])  # drop an IPv6 zone id (fe80::1%eth0)


def _refuse_private(address: IPAddress, host: str) -> None:
    if not is_public(address):
        raise UnsafeReference(
            f"{host} is {address}, a private or reserved address; pipeq fetches only public "
            "addresses unless PIPEQ_ALLOW_PRIVATE_URLS=true"
        )
