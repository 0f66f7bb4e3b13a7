#!/usr/bin/env bash
# Set up (if needed) and run the tests. The default run uses tiny offline stand-ins (a few minutes);
# `scripts/test.sh --slow` runs only the tests that need the real default model (several more minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh ray  # the Ray executor's tests run in the default run
export HF_HUB_OFFLINE=1
if [ "${1:-}" = "--slow" ]; then
  shift
  exec .venv/bin/python -m pytest -m slow "$@"
fi
exec .venv/bin/python -m pytest "$@"
