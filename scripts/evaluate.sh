#!/usr/bin/env bash
# Set up (if needed), run the reference evaluation on the default model, and regenerate the leaderboard.
# Extra arguments go to `benchmark evaluate` (e.g. --attack encoder,none).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/benchmark evaluate --defense sae_clamp --tasks ioi "$@"
.venv/bin/benchmark leaderboard
