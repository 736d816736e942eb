#!/usr/bin/env bash
# Run the test suite with an isolated Prefect home (no server needed: tests use prefect_test_harness).
# The headless-browser tests (tests/test_ui.py) need Debian's `chromium`: installed here when absent and
# running as root (CI), otherwise a message says how. Under CI=true a skipped non-GPU test fails
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

export PREFECT_HOME="$(mktemp -d)/prefect"
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120 PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
unset PREFECT_API_URL
# pyproject.toml's testpaths make it the whole suite when no path is given
exec .venv/bin/python -m pytest -q "$@"
