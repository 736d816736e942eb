#!/usr/bin/env bash
# Stop what `make demo` started: the workers first, then the server (SIGTERM; SIGINT is ignored by
# background jobs).
set -uo pipefail
source "$(dirname "$0")/env.sh"
for name in worker gpu-worker server; do
  f="$STATE/$name.pid"
  if [[ -f "$f" ]] && kill -0 "$(cat "$f")" 2>/dev/null; then
    pid=$(cat "$f")
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -KILL -- "-$pid" 2>/dev/null
    echo "stopped $name (pid $pid)"
  else
    echo "$name not running"
  fi
  rm -f "$f"
done
