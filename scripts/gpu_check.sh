#!/usr/bin/env bash
# The GPU check, on a machine with CUDA: the tests marked `gpu` (the engine end to end on CUDA in float32 and
# bfloat16, every attack), then attack steps on the GPU against 2 CPU threads of the same machine and the default
# command on the GPU, written as the GPU section of leaderboard/perf.md (and leaderboard/perf.json).
#
# Uses the Python it finds as $PYTHON (default: .venv/bin/python, else python3), which must have a CUDA build of
# torch and this project's requirements; `scripts/setup.sh` installs the CPU wheel, so on a GPU machine install
# the CUDA build of torch 2.13.0 for its driver first (https://pytorch.org/get-started/locally/), then
# `pip install -e . -c constraints.txt`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: this check needs a GPU")'
"$PYTHON" -m pytest -m gpu -p no:cacheprovider -q tests/test_device.py tests/test_hub_models.py
"$PYTHON" scripts/perf_benchmark.py --gpu-only
