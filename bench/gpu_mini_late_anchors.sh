#!/usr/bin/env bash
# One GPU lease, one unconditional `mini` root (teacher snapshots after Heun steps 5, 9 and 14 of 18 kept in the
# pairs; a one-step student reads x_T and x_0 only, so its rows are the plain preset's):
#   1. the one-step `mini` student at FIRST_STEPS (default 1,000; 0: skipped, SEC_PER_STEP or one H100's 401 / 3000
#      instead) steps: the same-root one-step row, and the one-step seconds per step on this GPU;
#   2. the late-anchor multi-step student (NFE 1 and 2, anchor_rho 3, output terms, 64 trajectory rows) for
#      MULTI_STEPS steps, evaluated at every NFE beside the teacher cut short (bench/multistep_frontier_mini.sh);
#   3. a one-step student trained for about the multi-step student's time (SAME_TIME=0: skipped);
#   4. the one-step student at 4,000 steps (issue 23's quality-vs-steps curve past 3,000), if the lease lasts;
#      it runs even when the multi-step student fails (its error stays in the log).
# GRAPHS=false trains the multi-step student eagerly instead of as one CUDA graph.
#   bash bench/gpu_mini_late_anchors.sh [ROOT] [MULTI_STEPS] [FIRST_STEPS]
set -euo pipefail
ROOT=${1:-/tmp/k/u}
MULTI_STEPS=${2:-1000}
FIRST=${3:-1000}
ARCHIVE=${KDM_DATA_DIR:-.data}/cifar10-jpeg.tar.gz
DEST=docs/bench/multistep-mini-late
ONE=(--root "$ROOT" --preset mini --set "pairs.sampler.snapshot_steps=[5,9,14]" --set "dataset.archive=$ARCHIVE"
     --quiet)
SEC=${SEC_PER_STEP:-}                # empty: bench/multistep_frontier_mini.sh's default (one H100)
if [ "$FIRST" != 0 ]; then
  python3 bench/student_steps.py "${ONE[@]}" --steps "$FIRST" --out "$DEST" --variant one-step
  SEC=$(python3 -c "
import json
rows = [json.loads(l) for l in open('$DEST/steps.jsonl')]
r = [r for r in rows if r['variant'] == 'one-step' and r['steps'] == $FIRST][-1]
print(r['train_seconds'] / $FIRST)")
fi
echo "one-step seconds per step: ${SEC:-the default}"
export VARIANT="late:model.nfe_train=[1,2],model.anchor_rho=3,model.trajectory_output=true,model.trajectory_rows=64,train.cuda_graphs=${GRAPHS:-true}"
if SAME_TIME=0 bash bench/multistep_frontier_mini.sh "$ROOT" "$DEST" "$MULTI_STEPS"; then
  python3 -c "
import json, shutil
r = [json.loads(l) for l in open('$DEST/steps.jsonl') if json.loads(l)['variant'] == 'late'][-1]
for src, dst in (('evaluation', 'frontier.png'), ('evaluation', 'metrics.json'), ('evaluation', 'manifest.json'),
                 ('student', 'manifest.json')):
    shutil.copy(r[src] + '/' + dst, '$DEST/' + (dst if dst != 'manifest.json' else src + '-manifest.json'))" \
  || echo "the evaluation's files were not copied (above)"
  [ "${SAME_TIME:-1}" = 0 ] || SEC_PER_STEP=$SEC bash bench/multistep_frontier_mini.sh "$ROOT" "$DEST" "$MULTI_STEPS"
else
  echo "the multi-step student failed (above); going on with the 4,000-step one-step student"
fi
python3 bench/student_steps.py "${ONE[@]}" --steps 4000 --out docs/bench/student-steps-uncond
