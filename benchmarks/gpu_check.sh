#!/usr/bin/env bash
# The GPU check, one prepared run on a machine with ONE CUDA GPU (about 3-5 minutes; at most 8):
#
#   benchmarks/gpu_check.sh [OUT_DIR]       # default OUT_DIR: $OUT, else benchmarks/results/gpu_check
#
# 1. tests/gpu (pytest -m gpu):
#    - test_gpu_tp1.py: TP=1 on NCCL against PEFT on the same GPU: LoRA, DoRA and QLoRA (nf4 on
#      CUDA, if bitsandbytes is importable) in float32 (logits, every adapter gradient, three
#      AdamW steps); the bf16 base with float32 adapters within 3x PEFT's own bf16-vs-float32
#      error; the PEFT export loaded back by peft on the GPU; every parameter, buffer and output on
#      cuda:0.
#    - test_gpu_shared.py: two ranks on the one GPU. NCCL: refused by dist_lora on both ranks,
#      naming the setting (NCCL itself cannot put two ranks on one device). gloo
#      (backend="gloo"): TP=2 equals PEFT (logits, gradients), replicas stay equal.
# 2. benchmarks/gpu_step_time.py: bf16 step time (forward + backward + AdamW) of 4 Llama-3-8B-shaped
#    layers at TP=1, 1 x 4096 tokens, LoRA r=16 on every linear layer: dist_lora and PEFT.
#
# Needs python3 with CUDA torch, transformers, peft, safetensors, pytest, PyYAML; megatron-core
# (and bitsandbytes for QLoRA) may come as wheels in .whl/ (a machine without a registry):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#     -d .whl megatron-core==0.19.2 bitsandbytes==0.50.2
# Results (the logs, the JUnit XML and the timing JSON) go to OUT_DIR; the exit code is the tests'.
# DIST_LORA_GPU_CHECK_ON_CPU=1 runs the same on the CPU (gloo, tiny benchmark shapes) to check the
# script and the tests' own code before a GPU session; its results are not GPU results.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-benchmarks/results/gpu_check}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/site}  # where the carried wheels are installed
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { echo "installing .whl/ failed"; exit 3; }
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
start=$(date +%s)
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" - <<'EOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpus", torch.cuda.device_count(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
for name in ("megatron-core", "transformers", "peft", "safetensors", "bitsandbytes"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
EOF
} > "$OUT_DIR/machine.txt" 2>&1
cat "$OUT_DIR/machine.txt"

BENCH_ARGS=()
if [ "${DIST_LORA_GPU_CHECK_ON_CPU:-0}" = 1 ]; then
  export DIST_LORA_GPU_TESTS_ON_CPU=1
  BENCH_ARGS=(--smoke)
fi
timeout "${GPU_CHECK_TEST_TIMEOUT:-330}" "$PY" -m pytest -q -m gpu -p no:cacheprovider -rA tests/gpu --junitxml "$OUT_DIR/gpu_tests.xml" \
  2>&1 | tee "$OUT_DIR/gpu_tests.log"
tests=${PIPESTATUS[0]}
timeout "${GPU_CHECK_BENCH_TIMEOUT:-150}" "$PY" benchmarks/gpu_step_time.py --out "$OUT_DIR/step_time.json" "${BENCH_ARGS[@]}" 2>&1 | tee "$OUT_DIR/step_time.log"
bench=${PIPESTATUS[0]}
echo "gpu tests exit $tests, step-time exit $bench, $(( $(date +%s) - start )) s" | tee "$OUT_DIR/summary.txt"
exit "$tests"
