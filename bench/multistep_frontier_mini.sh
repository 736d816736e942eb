#!/usr/bin/env bash
# Issue 25's CIFAR-10 frontier on the `mini` preset, on one GPU: the multi-step student (NFE 1, 2, 4 on EDM Heun
# snapshots after steps 5, 9 and 14 of 18) with the teacher's sampler cut to 3, 5, 9, 17 and 35 NFE, then a
# one-step student on the same pairs for about the same training time (its step count from the multi-step
# student's measured train seconds and the one-step mini student's 401 s for 3,000 steps on one H100).
#   bash bench/multistep_frontier_mini.sh [ROOT] [OUTDIR] [MULTISTEP_STEPS]
# Rows go to OUTDIR/steps.jsonl|md|png (bench/student_steps.py); the evaluation's frontier.png is under ROOT.
set -euo pipefail
ROOT=${1:-/tmp/k/frontier}
DEST=${2:-docs/bench/multistep-mini}
STEPS=${3:-1000}
ARCHIVE=${KDM_DATA_DIR:-.data}/cifar10-jpeg.tar.gz
COMMON=(--root "$ROOT" --preset mini --set "pairs.sampler.snapshot_steps=[5,9,14]" --set "dataset.archive=$ARCHIVE"
        --out "$DEST" --quiet)
python3 bench/student_steps.py "${COMMON[@]}" --steps "$STEPS" \
  --variant "nfe124:model.nfe_train=[1,2,4],model.trajectory_rows=64" --set "evaluation.teacher_nfe=[3,5,9,17,35]"
N=$(python3 -c "
import json, sys
rows = [json.loads(l) for l in open('$DEST/steps.jsonl')]
t = [r['train_seconds'] for r in rows if r['variant'] == 'nfe124' and r['steps'] == $STEPS][-1]
print(max(100, round(t / (401 / 3000) / 100) * 100))")
echo "one-step student: $N steps for about the multi-step student's training time"
python3 bench/student_steps.py "${COMMON[@]}" --steps "$N" --variant one-step
