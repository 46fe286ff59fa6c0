#!/usr/bin/env bash
# The GPU benchmark as one command (see bench/gpu.py and docs/performance.md); extra flags pass through.
set -euo pipefail; cd "$(dirname "$0")/.." && PYTHONUNBUFFERED=1 exec python3 bench/gpu.py "$@"
