#!/usr/bin/env bash
# The full battery on the default model: every built-in defense and the example submission against every suite it
# fits, with its constrained attack (encoder; jacobian for the multi-site defense), the unconstrained `none` and
# the soft-suffix baseline; then the leaderboard. Each run writes one record and names its commit.
#
# Runs whose record exists already are kept (--keep-existing), so the battery can be filled in over several
# sessions; delete a record to run it again. Extra arguments go to every `benchmark evaluate` (e.g. --threads 1).
# For a cluster, give each (defense, suite) its own job, or split one run with --shard i/n and `benchmark merge`.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
B=.venv/bin/benchmark
ALL=tpp,wmdp_bio,ioi,refusal
run() { $B evaluate --keep-existing "$@"; }

# each suite's reference defense (the default battery), then its other attack modes
run --defense reference --attack encoder,none,soft_suffix "$@"
# defenses that fit on any suite: encoder first, so the main table fills before the other modes
GENERIC="sae_clamp error_projection_clamp sae_reconstruct_clamp directional_ablation none submissions/decoder_span_ablation"
for d in $GENERIC; do run --defense "$d" --tasks "$ALL" --attack encoder "$@"; done
# the multi-site clamp's default layers are 8, 12, 16; TPP reads the residual after block 12, so there it takes 8, 12
MULTI=(--defense multi_layer_clamp --tasks wmdp_bio,ioi,refusal)
MULTI_TPP=(--defense multi_layer_clamp --tasks tpp -D "layers=[8,12]")
run "${MULTI[@]}" --attack jacobian "$@"
run "${MULTI_TPP[@]}" --attack jacobian "$@"
for d in $GENERIC; do run --defense "$d" --tasks "$ALL" --attack none,soft_suffix "$@"; done
run "${MULTI[@]}" --attack encoder,none,soft_suffix "$@"
run "${MULTI_TPP[@]}" --attack encoder,none,soft_suffix "$@"
$B leaderboard
