#!/bin/sh
# Regenerates the lock files the Dockerfile installs from (`uv pip compile`, Linux x86-64,
# Python 3.11 as in the images). torch and what its CUDA build brings (nvidia-*, cuda-*, triton)
# are left out of worker.txt: the Dockerfile installs them first from the CUDA index that matches
# its base image, and PyPI's torch would name another CUDA's libraries.
set -eu
cd "$(dirname "$0")/.."
common="--python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-header --quiet"
cuda=$(uv pip compile pyproject.toml --extra worker $common --no-annotate \
  | sed -n 's/^\(nvidia-[a-z0-9-]*\|cuda-[a-z0-9-]*\|triton\)==.*/--no-emit-package \1/p')
# shellcheck disable=SC2086  # word splitting of the option lists is the point
uv pip compile pyproject.toml --extra worker $common --no-emit-package torch $cuda -o requirements/worker.txt
# shellcheck disable=SC2086
uv pip compile pyproject.toml --extra monitor $common -o requirements/api.txt
