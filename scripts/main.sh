#!/usr/bin/env bash
# The main job, from nothing: creates .venv, installs, runs the benchmark (python -m benchmarks).
# Default: every task and optimizer at the learning rates of the committed sweep, then the speed benchmark,
# into results/ (about 20 minutes on 2 cores). --quick: a smoke run of every task (about 2 minutes).
# The committed report: scripts/main.sh --full --ablation --out docs/benchmark (sweeps every rate again).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh bench
exec .venv/bin/python -m benchmarks "$@"
