#!/usr/bin/env bash
# Issue 26's measurements in one call on a GPU machine (one H100, <= 10 minutes, nothing downloaded).
#
# From the repository root, with the wheels and the official code carried along (carry [".whl", ".data"]):
#   .whl/                          the wheels the GPU image lacks (../shared/tools/device-wheels.sh builds them)
#   .data/off/kdm/                 a snapshot of azencot-group/KDM (git archive of the mirror, without
#                                  experiments/, data/, artifacts/)
#   .data/off/official_kdm_step.py ../shared/tools/official_kdm_step.py
#   .data/off/piq-0.8.0-py3-none-any.whl
#   .data/cifar10-jpeg.tar.gz      the CIFAR-10 archive (the mini teacher part)
# Run:  bash bench/issue26_gpu.sh
# Writes into $OUT (or docs/bench): speed-vs-official.json, speed-vs-official.md (the BENCHMARKS.md rows),
# speed-vs-official-parts.log (every part's log) and issue26-gpu.log (this script's output).
# ISSUE26_SECONDS (default 580) is the time everything must end within, the set-up included; ISSUE26_PARTS
# (default all: official,engine,mini,teacher,pairs,sampling) picks parts, e.g. for a second call.
set -uo pipefail
START=$(date +%s)
DEST=${OUT:-docs/bench}
mkdir -p "$DEST"
exec > >(tee "$DEST/issue26-gpu.log") 2>&1
export PYTHONUNBUFFERED=1
smi() {
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,power.limit,memory.used --format=csv 2>&1
  nvidia-smi --query-gpu=clocks_event_reasons.active --format=csv 2>/dev/null
  nvidia-smi --query-compute-apps=pid,used_memory --format=csv 2>&1
  true
}
echo "== $(date -Is) start"; smi

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile .whl/*.whl || { echo "wheel install failed"; exit 1; }
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . || { echo "kdm install failed"; exit 1; }
OFF=/tmp/kdm-official
rm -rf "$OFF" && mkdir -p "$OFF"
if [ -d .data/off/kdm ] && [ -f .data/off/official_kdm_step.py ]; then
  cp -r .data/off/kdm "$OFF/kdm" && cp .data/off/official_kdm_step.py "$OFF/"
  python3 -m pip install -q --no-index --no-deps .data/off/piq-*.whl || echo "piq install failed: the official part will fail"
else
  echo "no .data/off (official code, script, piq wheel): the official part will be skipped"
fi
python3 -c "import torch, prefect, zarr; print('torch', torch.__version__, 'prefect', prefect.__version__, 'zarr', zarr.__version__)"

NOW=$(date +%s)
BUDGET=$(( ${ISSUE26_SECONDS:-580} - (NOW - START) ))
echo "== set-up took $((NOW - START)) s; budget for the parts: $BUDGET s"
python3 bench/speed_vs_official.py --official-dir "$OFF" --archive .data/cifar10-jpeg.tar.gz \
  --budget-s "$BUDGET" --out-dir "$DEST" --keep-logs --parts "${ISSUE26_PARTS:-official,engine,mini,teacher,pairs,sampling}"
RC=$?
echo "== $(date -Is) end (driver exit $RC, $(( $(date +%s) - START )) s)"; smi
exit $RC
