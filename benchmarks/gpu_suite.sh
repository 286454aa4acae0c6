#!/usr/bin/env bash
# Every GPU benchmark in one command; fills benchmarks/RESULTS.md's GPU tables (gpu-suite blocks).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m benchmarks.gpu_suite --json benchmarks/gpu_suite.json "$@"
