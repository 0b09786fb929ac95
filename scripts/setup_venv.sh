#!/usr/bin/env bash
# Create (or reuse) .venv and install the project with the given extras.
# Usage: scripts/setup_venv.sh EXTRAS   e.g. scripts/setup_venv.sh dev
set -euo pipefail
cd "$(dirname "$0")/.."
extras="$1"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
    -c constraints.txt -e ".[${extras}]"
