import os
import tempfile

import pytest

# Isolate Prefect from any user/server settings before prefect is imported anywhere.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="kdm-prefect-"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ.pop("PREFECT_API_URL", None)
# Nor from a developer's production credentials or worker settings (pipeline.access reads both).
for _name in ("PREFECT_API_AUTH_STRING", "PREFECT_SERVER_API_AUTH_STRING", "KDM_ALLOWED_ROOTS"):
    os.environ.pop(_name, None)


@pytest.fixture
def one_thread():
    """torch on one intra-op thread for the test, restored afterwards; a test module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    from image_fixtures import single_thread
    with single_thread():
        yield


@pytest.fixture(scope="module")
def harness():
    """A Prefect test server for the module's flow runs."""
    from prefect.testing.utilities import prefect_test_harness
    with prefect_test_harness(server_startup_timeout=120):
        yield

