#!/usr/bin/env bash
# Issue 25's CIFAR-10 frontier on the `mini` preset, on one GPU: a multi-step student (by default NFE 1, 2, 4 on
# EDM Heun snapshots after steps 5, 9 and 14 of 18) with the teacher's sampler cut to 3, 5, 9, 17 and 35 NFE, then
# a one-step student on the same pairs for about the same training time (its step count from the multi-step
# student's measured train seconds and SEC_PER_STEP, the one-step mini student's seconds per step on the same
# GPU: default 401 / 3000, one H100).
#   bash bench/multistep_frontier_mini.sh [ROOT] [OUTDIR] [MULTISTEP_STEPS]
#   VARIANT="late:model.nfe_train=[1,2],model.anchor_rho=3,model.trajectory_output=true,model.trajectory_rows=64" \
#   SEC_PER_STEP=0.12 bash bench/multistep_frontier_mini.sh /tmp/k/u docs/bench/multistep-mini-late 1000
# SAME_TIME=0 skips the one-step student. Rows go to OUTDIR/steps.jsonl|md|png (bench/student_steps.py); the
# evaluation's frontier.png is under ROOT.
set -euo pipefail
ROOT=${1:-/tmp/k/frontier}
DEST=${2:-docs/bench/multistep-mini}
STEPS=${3:-1000}
VARIANT=${VARIANT:-"nfe124:model.nfe_train=[1,2,4],model.trajectory_rows=64"}
SEC_PER_STEP=${SEC_PER_STEP:-$(python3 -c "print(401 / 3000)")}
ARCHIVE=${KDM_DATA_DIR:-.data}/cifar10-jpeg.tar.gz
COMMON=(--root "$ROOT" --preset mini --set "pairs.sampler.snapshot_steps=[5,9,14]" --set "dataset.archive=$ARCHIVE"
        --out "$DEST" --quiet)
python3 bench/student_steps.py "${COMMON[@]}" --steps "$STEPS" --variant "$VARIANT" \
  --set "evaluation.teacher_nfe=[3,5,9,17,35]"
[ "${SAME_TIME:-1}" = 0 ] && exit 0
N=$(python3 -c "
import json
rows = [json.loads(l) for l in open('$DEST/steps.jsonl')]
t = [r['train_seconds'] for r in rows if r['variant'] == '${VARIANT%%:*}' and r['steps'] == $STEPS][-1]
print(max(100, round(t / $SEC_PER_STEP / 100) * 100))")
echo "one-step student: $N steps for about the multi-step student's training time"
python3 bench/student_steps.py "${COMMON[@]}" --steps "$N" --variant one-step
