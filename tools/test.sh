#!/usr/bin/env bash
# The test suite (CPU, no network): sets up .venv if needed, then runs pytest. Extra args go to pytest.
# Every test runs, the ones marked `slow` (vLLM servers, many exports) included; for a quick check
# while editing, pass -m "not slow".
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
"${BAWA_VENV:-.venv}/bin/python" -m pytest -q "$@"
