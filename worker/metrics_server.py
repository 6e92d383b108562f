"""The worker's /metrics endpoint: a taken port makes it try the next ones, never die."""

from __future__ import annotations

import errno
import logging

from prometheus_client import start_http_server

log = logging.getLogger(__name__)


# A busy metrics port: how many ports after it a worker tries before it runs without metrics.
PORTS_TRIED = 32


def serve_metrics(port: int, host: str) -> int | None:
    """Serve /metrics on `host` (PIPEQ_METRICS_HOST, loopback unless opened up) at `port`, or
    the next free one of the PORTS_TRIED after it: a second worker on one host must not die of
    a taken port. Returns the port, or None when metrics are off (port 0) or none was free."""
    if not port:
        return None
    for candidate in range(port, port + PORTS_TRIED):
        try:
            start_http_server(candidate, addr=host)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            continue
        taken = f" (port {port} was taken)" if candidate != port else ""
        log.info("worker metrics on http://%s:%d/metrics%s", host, candidate, taken)
        return candidate
    log.warning(
        "worker metrics off: ports %d-%d on %s are all taken (PIPEQ_METRICS_PORT)",
        port,
        port + PORTS_TRIED - 1,
        host,
    )
    return None
