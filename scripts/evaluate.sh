#!/usr/bin/env bash
# Set up (if needed), run every suite against its reference defense on the default model (the default battery),
# and regenerate the leaderboard.
# Extra arguments go to `benchmark evaluate` (e.g. --attack encoder,none).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/benchmark evaluate --defense reference "$@"
.venv/bin/benchmark leaderboard
