"""Import time of the clients a web backend uses, each in a fresh interpreter (median of runs).

python -m bench.import_time [--runs 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

MODULES = (
    "pipeq.producer.client",
    "pipeq.producer.async_client",
    "pipeq.producer.http_client",
    "pipeq.producer.async_http_client",
)
PROBE = (
    "import time, sys\n"
    "began = time.perf_counter()\n"
    "import {module}\n"
    "print(time.perf_counter() - began, 'torch' in sys.modules)\n"
)


def measure(module: str, runs: int) -> dict[str, object]:
    times, torch = [], False
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, "-c", PROBE.format(module=module)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        times.append(float(out[0]) * 1000)
        torch = torch or out[1] == "True"
    return {"module": module, "median_ms": round(statistics.median(times), 1), "torch": torch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    print(json.dumps([measure(module, args.runs) for module in MODULES], indent=2))


if __name__ == "__main__":
    main()
