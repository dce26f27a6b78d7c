#!/usr/bin/env bash
# One GPU session's checks and timings, each part bounded by its own timeout (all parts together
# take longer than one 10-minute device command: pick some with PARTS).
# Usage (on the GPU machine, from the repo root): OUT=results_dir bash experiments/gpu_bench.sh
# PARTS picks and orders the parts (default: all), e.g. PARTS="profile train" for the
# detector work of issues #6/#7 alone, PARTS="mt mt_bf16" for the Mean Teacher step (#11).
# Needs jax[cuda], flax, optax, torch, torchvision, scikit-image; pycocotools and ml_collections
# for the end-to-end discovery benchmark.
set -u
OUT=${OUT:-/tmp/hassod_gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
run() {  # name seconds command...
  local name=$1 secs=$2; shift 2
  echo "=== $name ($(date +%T), limit ${secs}s)"
  timeout "$secs" "$@" 2>&1 | grep -v -i "warning" | tee "$OUT/$name.log" | tail -40
  echo "=== $name exit ${PIPESTATUS[0]}"
}
PARTS=${PARTS:-"hac crf features discovery detector profile train mt mt_bf16"}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
for part in $PARTS; do
  case $part in
  hac) run hac 80 python3 experiments/bench_hac.py --batch 8 64 256 512 --no-oracle \
    --out "$OUT/hac.json" ;;
  crf) run crf 100 python3 experiments/bench_crf.py --batch 8 --out "$OUT/crf.json" ;;
  features) run features 110 python3 experiments/bench_features.py \
    --models vit_small_patch8,vit_base_patch8 --batches 1,8,32 --dtypes float32,bfloat16 \
    --out "$OUT/features.json" ;;
  discovery) run discovery 100 python3 experiments/bench_discovery.py --images 48 --batch 16 \
    --crf jax --out "$OUT/discovery.json" ;;
  detector) run detector 170 python3 experiments/bench_detector.py --dtypes bfloat16 \
    --max-sampling 4 --steps 5 --out "$OUT/detector.json" ;;
  profile) run profile 240 python3 experiments/profile_detector.py --steps 5 \
    --out "$OUT/profile.json" ;;
  train) run train 240 python3 experiments/bench_train.py --steps 5 --workers 8 \
    --out "$OUT/train.json" ;;
  mt) run mt_f32 300 python3 experiments/bench_mean_teacher.py --gpu --steps 5 \
    --out "$OUT/mt_f32.json" ;;
  mt_bf16) run mt_bf16 200 python3 experiments/bench_mean_teacher.py --gpu --steps 5 \
    --dtype bfloat16 --out "$OUT/mt_bf16.json" ;;
  *) echo "unknown part $part" ;;
  esac
done
