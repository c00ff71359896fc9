#!/usr/bin/env bash
# The first-GPU check, as one script: CUDA-marked tests, cache-teacher vs the bare teacher forward (bf16), and a
# distill epoch from the cache vs a CE epoch without it. JSON and a log land in OUT_DIR.
#   bash benchmarks/gpu_check.sh OUT_DIR            # on a GPU machine: all 50k CIFAR-10-sized images, resnet56
#   bash benchmarks/gpu_check.sh OUT_DIR --tiny     # on CPU in a minute (CI runs this so the script cannot rot)
# Optional: DATA='.../cifar10-train-{000000..000024}.tar' TEACHER_CKPT=.../resnet56-4bfd9763.th (else synthetic
# images and a seeded random teacher: the same shapes and work, so the same speed). PYTHON=... picks the interpreter.
set -euo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR [--tiny]}
shift
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
"${PYTHON:-python3}" benchmarks/gpu_check.py --out "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
