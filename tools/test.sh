#!/usr/bin/env bash
# The test suite (CPU, no network): sets up .venv if needed, then runs pytest. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
"${BAWA_VENV:-.venv}/bin/python" -m pytest -q "$@"
