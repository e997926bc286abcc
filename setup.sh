#!/usr/bin/env bash
# Set-up in one command: create .venv in the repository root, install dist_lora (with the CPU
# build of torch when there is no NVIDIA GPU), then run the main job.
#
#   ./setup.sh                      # install + main job
#   DIST_LORA_SKIP_DEMO=1 ./setup.sh  # install only
#   DIST_LORA_TORCH='torch==2.13.0'   # override the torch requirement used without a GPU
#   PYTHON=python3.12 VENV=.venv312   # another interpreter, in its own virtual environment
#   DIST_LORA_MEGATRON='megatron-core==0.19.2'  # pin megatron-core (default: the newest in range)
#   DIST_LORA_EXTRAS='test,mpi,quant'           # extras to install (default: test,mpi,deepspeed,quant)
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off -q)

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${PIP[@]}" torch
  else
    # Without a GPU, a pinned release resolves to the CPU wheel where one is provided (a loose
    # 'torch' would pull a multi-GB CUDA build; for Python 3.12 the registry has only CUDA builds,
    # which run on the CPU too).
    "${PIP[@]}" "${DIST_LORA_TORCH:-torch==2.13.0}"
  fi
fi
"${PIP[@]}" -e ".[${DIST_LORA_EXTRAS:-test,mpi,deepspeed,quant}]" ${DIST_LORA_MEGATRON:+"$DIST_LORA_MEGATRON"}

if [ "${DIST_LORA_SKIP_DEMO:-0}" != 1 ]; then
  # The main job: fine-tune the demo at TP=2, export the adapter in PEFT's format, verify it with peft.
  "$VENV/bin/torchrun" --standalone --nproc_per_node 2 launch/finetune.py --config configs/demo.yaml
fi
