#!/usr/bin/env bash
# Set-up in one command: create .venv in the repository root, install dist_lora (with the CPU
# build of torch when there is no NVIDIA GPU), then run the main job.
#
#   ./setup.sh                      # install + main job
#   DIST_LORA_SKIP_DEMO=1 ./setup.sh  # install only
#   DIST_LORA_TORCH='torch==2.13.0'   # override the torch requirement used without a GPU
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check --progress-bar off -q)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${PIP[@]}" torch
  else
    # Without a GPU, a pinned release resolves to the CPU wheel where one is provided (a loose
    # 'torch' would pull a multi-GB CUDA build).
    "${PIP[@]}" "${DIST_LORA_TORCH:-torch==2.13.0}"
  fi
fi
"${PIP[@]}" -e ".[test,mpi,deepspeed,quant]"

if [ "${DIST_LORA_SKIP_DEMO:-0}" != 1 ]; then
  # The main job: fine-tune the demo at TP=2, export the adapter in PEFT's format, verify it with peft.
  .venv/bin/torchrun --standalone --nproc_per_node 2 launch/finetune.py --config configs/demo.yaml
fi
