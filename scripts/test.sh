#!/usr/bin/env bash
# Run the test suite with an isolated Prefect home (no server needed: tests use prefect_test_harness).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
export PREFECT_HOME="$(mktemp -d)/prefect"
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120 PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
unset PREFECT_API_URL
# With test paths among the arguments, run just those; otherwise the whole suite.
targets=(tests)
for arg in "$@"; do [[ "$arg" == tests/* || "$arg" == tests ]] && targets=(); done
exec .venv/bin/python -m pytest -q "${targets[@]}" "$@"
