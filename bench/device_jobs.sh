#!/usr/bin/env bash
# Long GPU work across several device calls (each <= 10 minutes) on one warm machine: jobs run detached from
# the call under setsid in a copy of the repository in /tmp, so a call can end while they go on, and the next
# call (issued at once: the machine stays warm for only 30 s) polls them. Artifacts stay under /tmp for the lease.
#
#   bash bench/device_jobs.sh setup             # once per machine: wheels from .whl/ (carry it), the repo copied
#                                               # to /tmp/kdm-src and installed there, the CIFAR-10 archive from
#                                               # .data/ (carry it) into KDM_DATA_DIR=/tmp/kdm-data; later calls
#                                               # refresh the code only
#   bash bench/device_jobs.sh start NAME 'CMD'  # CMD in /tmp/kdm-src, detached; log /tmp/jobs/NAME.log
#   bash bench/device_jobs.sh wait SECONDS      # until every job has ended or SECONDS passed; prints each log's
#                                               # tail and packs the logs and every docs/bench, BENCHMARKS.md,
#                                               # RESULTS.md file newer than the setup into $OUT/res.tgz
# Example (one call of <= 600 s, then more `wait` calls):
#   bash bench/device_jobs.sh setup && bash bench/device_jobs.sh start cond \
#     "python3 bench/deployment_run.py --deployment kdm/distill-cifar10-cond --preset mini --root /tmp/k/c \
#      --out docs/bench/deployment-mini-cond-h100.json" && bash bench/device_jobs.sh wait 500
set -u
SRC=/tmp/kdm-src
STAMP=/tmp/kdm-setup-done
mkdir -p /tmp/jobs
case "${1:-}" in
  setup)
    if [ ! -f $STAMP ]; then
      python3 -m pip install -q --no-index --no-deps --no-compile .whl/*.whl || exit 1
      rm -rf $SRC && mkdir -p $SRC && cp -r . $SRC/ && rm -rf $SRC/.whl
      (cd $SRC && python3 -m pip install -q --no-deps --no-build-isolation -e .) || exit 1
      mkdir -p /tmp/kdm-data && cp .data/cifar10-jpeg.tar.gz /tmp/kdm-data/ 2>/dev/null
      touch $STAMP
    else
      tar cf - --exclude=./.whl --exclude=./.git . | (cd $SRC && tar xf -)
    fi
    nvidia-smi --query-gpu=name,memory.used --format=csv
    ;;
  start)
    [ $# -eq 3 ] || { echo "usage: $0 start NAME 'CMD'"; exit 2; }
    (cd $SRC && KDM_DATA_DIR=/tmp/kdm-data PYTHONUNBUFFERED=1 \
      setsid bash -c "$3; echo EXIT=\$?" > /tmp/jobs/$2.log 2>&1 < /dev/null &)
    echo "started $2"
    ;;
  wait)
    T0=$(date +%s)
    while [ $(( $(date +%s) - T0 )) -lt "${2:-60}" ]; do
      running=0
      for f in /tmp/jobs/*.log; do [ -e "$f" ] && ! grep -q '^EXIT=' "$f" && running=1; done
      [ $running = 0 ] && break
      sleep 10
    done
    for f in /tmp/jobs/*.log; do [ -e "$f" ] && { echo "== $f"; tail -c 2000 "$f" | tr '\r' '\n' | tail -n 15; }; done
    nvidia-smi --query-gpu=name,utilization.gpu,memory.used --format=csv
    if [ -n "${OUT:-}" ] && [ -f $STAMP ]; then
      (cd / && tar czf "$OUT/res.tgz" tmp/jobs $(cd $SRC && find docs/bench BENCHMARKS.md RESULTS.md \
        -newer $STAMP -type f 2>/dev/null | sed "s|^|tmp/kdm-src/|"))
    fi
    ;;
  *)
    sed -n '2,17p' "$0"; exit 2
    ;;
esac
