# Environment shared by the demo scripts: everything Prefect keeps lives under .kdm/ in the repository.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export KDM_REPO="$REPO"
KDM_PORT="${KDM_PORT:-4200}"
STATE="$REPO/.kdm"
mkdir -p "$STATE"
export PREFECT_HOME="$STATE/prefect"
export PREFECT_API_DATABASE_CONNECTION_URL="sqlite+aiosqlite:///$STATE/prefect/prefect.db"
export PREFECT_API_URL="http://127.0.0.1:$KDM_PORT/api"
export PREFECT_UI_API_URL="$PREFECT_API_URL"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
# The demo server is unauthenticated on 127.0.0.1: credentials of a production server in the calling
# shell are neither needed nor sent to it.
unset PREFECT_API_AUTH_STRING PREFECT_SERVER_API_AUTH_STRING
export PREFECT_LOGGING_LEVEL="${PREFECT_LOGGING_LEVEL:-INFO}"
export PATH="$REPO/.venv/bin:$PATH"
