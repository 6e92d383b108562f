"""A bound on a worker process's private memory, so that an input whose decoding or preprocessing
would take gigabytes fails alone (MemoryError, then `OutOfMemory` for that input) instead of the
kernel's OOM killer taking the worker and every job in it.

RLIMIT_DATA, not RLIMIT_AS: since Linux 4.7 RLIMIT_DATA counts private writable mappings (the
heap and anonymous mmaps that malloc, numpy, Pillow and torch's CPU allocator use), not address
space that is only reserved. CUDA reserves tens to hundreds of GiB of address space up front
(PROT_NONE) and maps device memory shared, so an RLIMIT_AS low enough to matter makes CUDA fail
to initialise or allocate; RLIMIT_DATA counts neither. glibc's per-thread malloc arenas reserve
64 MiB each the same way and count only as they are used.

The bound is relative: what the process holds once its models are loaded and warm and its pool
has started (VmData in /proc/self/status, the figure the kernel checks against the limit), plus
PIPEQ_WORKER_MEMORY_HEADROOM_MB, so one setting fits a small model and a large one.

What it does not catch: native code that aborts instead of failing an allocation (Rust's
`tokenizers`) still takes the worker down, which PIPEQ_MAX_DELIVERIES then bounds; while one input
holds memory near the bound, another thread's allocation may fail too (and OpenMP, which runs
torch's CPU kernels, aborts the process when it cannot start a thread), so the headroom is sized
for the largest legitimate input with room to spare; thread stacks (8 MiB of address space each)
count against it.
"""

from __future__ import annotations

import logging
import resource
from pathlib import Path

log = logging.getLogger(__name__)

_MIB = 1024 * 1024


def data_bytes() -> int:
    """This process's private writable memory as the kernel counts it for RLIMIT_DATA."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmData:"):
            return int(line.split()[1]) * 1024
    raise OSError("/proc/self/status has no VmData line")


def bound_memory(headroom_mb: int) -> int | None:
    """Limit this process's RLIMIT_DATA to what it holds now plus `headroom_mb`; returns the
    limit in bytes, None when there is none (headroom 0, or no /proc to measure against)."""
    if not headroom_mb:
        return None
    try:
        held = data_bytes()
    except OSError as exc:
        log.warning("worker memory is not bounded: %s", exc)
        return None
    limit = held + headroom_mb * _MIB
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    log.info(
        "worker private memory bounded at %d MiB (%d MiB held + PIPEQ_WORKER_MEMORY_HEADROOM_MB)",
        limit // _MIB,
        held // _MIB,
    )
    return limit
