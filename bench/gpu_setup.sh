# Device-machine setup for bench/gpu.py. From the repo root: `source bench/gpu_setup.sh`
# .gpu is built here (Debian 12 x86-64, with network) by `bash bench/gpu_carry.sh`.
# Needs the ignored folder .gpu (run's carry: [".gpu"]): .gpu/whl/*.whl (cp312 manylinux wheels)
# and .gpu/redis/{usr/bin,lib} (Debian 12 redis-server and its shared libraries).
# Installs into /tmp/site each carried wheel the image lacks or has at an older version,
# starts redis-server on 127.0.0.1:6399 (daemonized, no persistence), waits for PING, and
# links the repository's folders as the package pipeq, exports PYTHONPATH and (unless set)
# PIPEQ_BROKER_URL. Idempotent on a warm machine.
(
  set -euo pipefail
  sel=$(python3 - <<'EOF'
import glob, os, sys
from importlib.metadata import PackageNotFoundError, version
from packaging.version import Version
kept = []
for w in sorted(glob.glob(".gpu/whl/*.whl")):
    name, ver = os.path.basename(w).split("-")[:2]
    try:
        have = version(name)
    except PackageNotFoundError:
        have = None
    if have is not None and Version(have) >= Version(ver):
        kept.append(f"{name} {have}")
    else:
        print(w)
if kept:
    print("gpu_setup: already there, not installed:", ", ".join(kept), file=sys.stderr)
EOF
  )
  if [ -n "$sel" ]; then
    # shellcheck disable=SC2086  # wheel file names hold no spaces
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site $sel
  fi
  R=.gpu/redis
  LD_LIBRARY_PATH=$R/lib $R/usr/bin/redis-server --bind 127.0.0.1 --port 6399 --save '' \
    --appendonly no --daemonize yes --dir /tmp --logfile /tmp/redis-6399.log \
    --pidfile /tmp/redis-6399.pid
  PYTHONPATH=/tmp/site python3 - <<'EOF'
import time, redis
r = redis.Redis(host="127.0.0.1", port=6399)
for _ in range(100):
    try:
        r.ping()
        break
    except redis.ConnectionError:
        time.sleep(0.1)
else:
    raise SystemExit("gpu_setup: redis-server on :6399 did not answer; see /tmp/redis-6399.log")
print("gpu_setup: redis", r.info("server")["redis_version"], "up on 127.0.0.1:6399", flush=True)
EOF
) || return 1 2>/dev/null || exit 1
# The repository's folders as the one import name `pipeq` (pyproject.toml's package-dir), without
# an install: links under /tmp/pipeq-src/pipeq.
mkdir -p /tmp/pipeq-src/pipeq
for package in config core producer worker cli; do ln -sfn "$PWD/$package" "/tmp/pipeq-src/pipeq/$package"; done
# `pipeq --version` reads the installed distribution's metadata: a minimal one beside the links.
mkdir -p /tmp/pipeq-src/pipeq-0.0.0.dist-info
printf 'Metadata-Version: 2.1\nName: pipeq\nVersion: %s\n' \
  "$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)" >/tmp/pipeq-src/pipeq-0.0.0.dist-info/METADATA
case ":${PYTHONPATH:-}:" in *":/tmp/site:/tmp/pipeq-src:"*) ;; *) export PYTHONPATH="/tmp/site:/tmp/pipeq-src${PYTHONPATH:+:$PYTHONPATH}" ;; esac
export PIPEQ_BROKER_URL="${PIPEQ_BROKER_URL:-redis://127.0.0.1:6399/0}"
# Tesseract (bench/docqa.py) from .gpu/tesseract/{bin,lib,tessdata}: a wrapper on PATH gives the
# carried libraries to tesseract alone, not to Python.
if [ -x .gpu/tesseract/bin/tesseract ]; then
  mkdir -p /tmp/pipeq-bin
  printf '#!/bin/sh\nLD_LIBRARY_PATH=%s/lib TESSDATA_PREFIX=%s/tessdata exec %s/bin/tesseract "$@"\n' \
    "$PWD/.gpu/tesseract" "$PWD/.gpu/tesseract" "$PWD/.gpu/tesseract" >/tmp/pipeq-bin/tesseract
  chmod +x /tmp/pipeq-bin/tesseract
  case ":$PATH:" in *":/tmp/pipeq-bin:"*) ;; *) export PATH="/tmp/pipeq-bin:$PATH" ;; esac
fi
echo "gpu_setup: export PYTHONPATH=$PYTHONPATH PIPEQ_BROKER_URL=$PIPEQ_BROKER_URL PATH=$PATH"
