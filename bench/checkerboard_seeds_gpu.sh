#!/usr/bin/env bash
# Build-to-build spread of the `checkerboard-import` student on one GPU: four seeds of the preset's settings
# and of three variants (hidden 512, batch 2048, 48,000 steps), 16 trainings on one GPU, $JOBS (default 4) at
# a time, each scored with the held-out protocol (bench/sweep_checkerboard_import.py). Give it the GPU to itself:
# started beside the CIFAR-10 stages of a recipe run with all 16 at once, 17 processes time-sliced the GPU and no
# training reached its first milestone in 7 minutes (BENCHMARKS.md). A GPU build differs from a CPU build of the same
# settings in its float arithmetic, so the spread over seeds is what this measures, not the CPU builds' numbers.
# (EMA 0.9999 is not a candidate: the EMA starts at the initial weights, which keep 0.9999^24000 = 9 % of it.)
#   bash bench/checkerboard_seeds_gpu.sh PAIRS_STORE   # the filtered store of `kdm distill --preset checkerboard-import`
# Writes docs/bench/checkerboard-official/gpu-seeds/<variant>-s<seed>.jsonl (or under $OUT).
set -uo pipefail
PAIRS=${1:?usage: $0 PAIRS_STORE}
DEST=${OUT:-docs/bench}/checkerboard-official/gpu-seeds
mkdir -p "$DEST"
PRESET='"hidden": 256, "latent": 256, "layers": 5, "latent_noise": 0.2, "fourier": 4, "fourier_scale": 0.5, "lr": 0.003, "schedule": "cosine", "ema": 0.999, "batch": 512, "steps": 24000'
declare -A VARIANT=(
  [preset]='"milestones": [16000, 24000]'
  [hidden512]='"hidden": 512'
  [b2048]='"batch": 2048'
  [steps48k]='"steps": 48000, "milestones": [24000, 36000, 48000]'
)
JOBS=${JOBS:-4}
for seed in 0 1 2 3; do
  for v in preset hidden512 b2048 steps48k; do
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 2; done
    python3 bench/sweep_checkerboard_import.py --device cuda --pairs "$PAIRS" --out "$DEST/$v-s$seed.jsonl" \
      --config "{$PRESET, ${VARIANT[$v]}, \"seed\": $seed}" > "$DEST/$v-s$seed.log" 2>&1 &
  done
done
wait
echo "done: $(ls "$DEST"/*.jsonl | wc -l) records"
