#!/usr/bin/env bash
# CI: build the fused activation kernel through deepnet_network's chain of flag sets with the compilers Debian
# ships (g++ 12, g++ 11 as on Ubuntu 22.04, clang) for AVX-512 with and without FP16, AVX2 and plain x86-64
# targets, and cross-compile it for aarch64. Root, Debian. Needs .venv (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
for attempt in 1 2 3; do
  if DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null && \
     DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
       g++ g++-11 clang g++-aarch64-linux-gnu >/dev/null; then break; fi
  [ "$attempt" = 3 ] && { echo "check_kernel_builds: could not install the compilers" >&2; exit 1; }
  sleep 10
done
"${PYTHON:-.venv/bin/python}" .ci/kernel_build_matrix.py
