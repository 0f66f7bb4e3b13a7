#!/usr/bin/env bash
# The full battery on the default model (its plan: benchmark/running/battery.py): every built-in defense and the example
# submission against every suite it fits, with its constrained attack (encoder; jacobian for the multi-site
# defense), the unconstrained `none` and the soft-suffix baseline; then the leaderboard. Each run writes one
# record and names its commit.
#
# Runs whose record exists already are kept, so the battery can be filled in over several sessions; delete a record
# to run it again. Arguments go to `benchmark battery` (--threads N, --quiet, --list, --executor ray).
# On several GPUs or a cluster: --executor ray (README: "Run on several GPUs or a cluster"; it needs
# `bash scripts/setup.sh ray`); by hand, give each (defense, suite) its own `benchmark evaluate` job, or split one
# run with --shard i/n and `benchmark merge`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/benchmark battery "$@"
.venv/bin/benchmark leaderboard
