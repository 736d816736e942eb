#!/usr/bin/env bash
# Start a local Prefect server (SQLite under .kdm/), register the deployments, start a worker, run
# kdm/distill-checkerboard, wait for it, print the metrics; the server stays up for the UI.
# KDM_DEMO_RUN=0 stops after the workers (no checkerboard run). The workers inherit this shell's
# environment: KDM_DATA_DIR (where datasets are found and downloaded, default ~/.cache/kdm/data) among it.
# The demo server has no authentication and listens on 127.0.0.1 only: it is reachable from this machine
# alone. Never publish it; a shared server is docker/compose.yaml (basic auth + CSRF, docker/README.md).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$REPO"

healthy() { curl -fsS "http://127.0.0.1:$KDM_PORT/api/health" >/dev/null 2>&1; }
alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

if alive "$STATE/server.pid" && healthy; then
  echo "Prefect server already running on 127.0.0.1:$KDM_PORT"
else
  if healthy; then
    echo "error: port $KDM_PORT is taken by another server; run with KDM_PORT=<free port> make demo" >&2
    exit 1
  fi
  echo "starting Prefect server on 127.0.0.1:$KDM_PORT (log: .kdm/server.log)"
  echo "  unauthenticated, bound to 127.0.0.1: only this machine can reach it (shared servers: docker/README.md)"
  setsid nohup prefect server start --host 127.0.0.1 --port "$KDM_PORT" >"$STATE/server.log" 2>&1 &
  echo $! >"$STATE/server.pid"
  for _ in $(seq 1 120); do healthy && break; sleep 1; done
  healthy || { echo "error: the Prefect server did not become healthy in 120 s; see .kdm/server.log" >&2; tail -20 "$STATE/server.log" >&2; exit 1; }
fi

prefect work-pool inspect kdm-cpu >/dev/null 2>&1 || prefect work-pool create kdm-cpu --type process >/dev/null
# kdm-gpu runs the GPU stages of kdm runs (deployment gpu-stage): one at a time per GPU, 1 without GPU.
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); [[ "${gpus:-0}" -ge 1 ]] || gpus=1
prefect work-pool inspect kdm-gpu >/dev/null 2>&1 || prefect work-pool create kdm-gpu --type process >/dev/null
prefect work-pool set-concurrency-limit kdm-gpu "$gpus" >/dev/null
prefect --no-prompt deploy --all >"$STATE/deploy.log" 2>&1 || { cat "$STATE/deploy.log" >&2; exit 1; }
echo "deployments registered: $(COLUMNS=250 prefect deployment ls 2>/dev/null | grep -oE '(kdm|gpu-stage|redistill)/[a-z0-9-]*' | sort -u | tr '\n' ' ')"

if ! alive "$STATE/worker.pid"; then
  setsid nohup prefect worker start --pool kdm-cpu --limit 1 >"$STATE/worker.log" 2>&1 &
  echo $! >"$STATE/worker.pid"
  echo "worker started on pool kdm-cpu (log: .kdm/worker.log)"
fi
if ! alive "$STATE/gpu-worker.pid"; then
  setsid nohup prefect worker start --pool kdm-gpu --limit "$gpus" >"$STATE/gpu-worker.log" 2>&1 &
  echo $! >"$STATE/gpu-worker.pid"
  echo "worker started on pool kdm-gpu, concurrency $gpus (log: .kdm/gpu-worker.log)"
fi

if [[ "${KDM_DEMO_RUN:-1}" == 0 ]]; then      # KDM_DEMO_RUN=0 make demo: everything but the checkerboard run
  echo "KDM_DEMO_RUN=0: server, deployments and workers are up; no run started"
  echo "Prefect UI: http://127.0.0.1:$KDM_PORT  (make stop stops the workers and the server)"
  exit 0
fi

start=$(date +%s)
echo "running kdm/distill-checkerboard (task progress below; full event stream: .kdm/last-run.log)"
prefect deployment run kdm/distill-checkerboard --watch "$@" >"$STATE/last-run.log" 2>&1 &
run_pid=$!
sleep 2
grep -m1 "URL:" "$STATE/last-run.log" | sed 's/^[^U]*/  /' || true
tail -n0 -F "$STATE/worker.log" 2>/dev/null | grep --line-buffered -E "Task run|Flow run .* (Finished|Crashed|Failed)" &
tail_pid=$!
rc=0; wait "$run_pid" || rc=$?
kill "$tail_pid" 2>/dev/null || true
wait "$tail_pid" 2>/dev/null || true
elapsed=$(( $(date +%s) - start ))
if [[ $rc -ne 0 ]] || ! grep -q "finished successfully" "$STATE/last-run.log"; then
  tail -5 "$STATE/last-run.log" >&2
  echo "error: the flow run did not complete (after ${elapsed} s); see .kdm/worker.log and the UI" >&2
  exit 1
fi
echo "flow run completed in ${elapsed} s"
echo
kdm report --root "$REPO/artifacts"
echo
echo "Prefect UI: http://127.0.0.1:$KDM_PORT  (flow runs -> the latest kdm run -> Artifacts)"
echo "  local demo server: no authentication, listening on 127.0.0.1 only (do not expose it)"
echo "make stop   stops the worker and the server"
