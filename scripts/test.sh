#!/usr/bin/env bash
# The README's test command: set up .venv, then run the whole suite offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 WANDB_MODE=offline
.venv/bin/python -m pytest -q "$@"
