#!/usr/bin/env bash
# The README's main job: set up .venv, then train a transcoder on SmolLM2-135M's MLP 3
# on the embedded text and print the held-out evaluation table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/sae-lens-transcoder train --config configs/smollm2-135m-layer3.yaml --json output/smollm2-135m-layer3.metrics.json "$@"
