#!/usr/bin/env bash
# The main job, from nothing: creates .venv, installs, runs the benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh bench
exec .venv/bin/python -m benchmarks "$@"
