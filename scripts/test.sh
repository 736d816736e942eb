#!/usr/bin/env bash
# Run the test suite with an isolated Prefect home (tests start their own Prefect servers).
# The headless-browser tests (tests/test_ui.py) need Debian's `chromium`: installed here when absent and
# running as root (CI), otherwise a message says how. The server tests need PostgreSQL on 127.0.0.1:5432
# (trust authentication) and Redis on 127.0.0.1:6379: the machine runs them (CI's and development
# machines start both before the tests) and this script starts neither; when one is absent the whole
# suite stops at once with one line per missing service. Under CI=true a skipped non-GPU test fails
# (tests/conftest.py), so nothing the tests need may be missing there.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"

if ! command -v chromium >/dev/null && [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "test.sh: installing Debian's chromium for the headless-browser UI tests"
        export DEBIAN_FRONTEND=noninteractive
        { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } ||
            echo "test.sh: installing chromium failed: the UI tests will skip (under CI=true: fail)" >&2
    else
        echo "test.sh: chromium is not installed: the UI tests (tests/test_ui.py) will skip" \
             "(under CI=true: fail). Install it with: sudo apt-get install chromium" >&2
    fi
fi

# Named datasets (cifar10) and the checkerboard trajectories come from the data directory: the shared data
# folder beside the checkout when there is one (CI runs a clean clone next to ../shared); tests never download.
if [ -z "${KDM_DATA_DIR:-}" ] && [ -d "$REPO/../shared/data" ]; then
    export KDM_DATA_DIR="$(cd "$REPO/../shared/data" && pwd)"
fi

# PostgreSQL and Redis (tests/services.py says what is missing and how to start it). Checked before the
# whole suite only: a run of chosen tests goes ahead, and a test that needs a missing service fails with
# the same line.
if [ "$#" = 0 ] && ! missing="$(.venv/bin/python tests/services.py 2>&1)"; then
    echo "$missing" | sed 's/^/test.sh: /' >&2
    exit 1
fi

export PREFECT_HOME="$(mktemp -d)/prefect"
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120 PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
unset PREFECT_API_URL
# pyproject.toml's testpaths make it the whole suite when no path is given
exec .venv/bin/python -m pytest -q "$@"
