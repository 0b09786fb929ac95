#!/usr/bin/env bash
# The whole test suite, from nothing: creates .venv, installs, runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh dev
exec .venv/bin/python -m pytest -q "$@"
