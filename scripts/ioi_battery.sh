#!/usr/bin/env bash
# Every built-in defense and the example submission on the IOI suite of the default model, then the
# leaderboard. This is the command sequence behind the committed IOI records; extra arguments go to every
# `benchmark evaluate` (e.g. --steps 20). Run it on a clean checkout so the records name a clean commit.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
B=.venv/bin/benchmark
$B evaluate --defense sae_clamp --tasks ioi --attack encoder,none,soft_suffix "$@"
for d in sae_reconstruct_clamp error_projection_clamp submissions/decoder_span_ablation directional_ablation none; do
  $B evaluate --defense "$d" --tasks ioi --attack encoder "$@"
done
$B evaluate --defense multi_layer_clamp --tasks ioi --attack jacobian,encoder "$@"
$B leaderboard
