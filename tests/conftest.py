import os
import re
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

# Named datasets (pipeline/data/sources.py) come from the project's shared data folder, never from a download:
# KDM_DATA_DIR points there and KDM_OFFLINE forbids downloads (tests of the download path set their own).
from shared_data import shared_data_dir  # noqa: E402

os.environ["KDM_DATA_DIR"] = str(shared_data_dir())
os.environ["KDM_OFFLINE"] = "1"
os.environ.pop("KDM_DATA_MIRROR", None)

# Under CI=true a skipped test is a failure: the suite installs what it needs (scripts/test.sh), so a skip
# there means a missing piece. Only tests marked ``gpu`` (their outcome depends on whether a CUDA device is
# visible) may skip, and only for that reason (the skip's reason names the GPU or CUDA). An xfail (or an
# unexpected pass of one) fails too: a known gap is not a green run.
STRICT = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}
GPU_REASON = re.compile(r"\b(gpus?|cuda)\b", re.IGNORECASE)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: depends on the presence (or absence) of a CUDA device; the only "
                                       "tests allowed to skip under CI=true")


def _skip_reason(report) -> str:
    return report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)


def _strict_failure(report, where: str) -> None:
    report.outcome = "failed"
    report.longrepr = (f"{where} skipped under CI=true ({_skip_reason(report)}); only tests marked 'gpu' may skip "
                       "in CI, and only for want (or presence) of a GPU: install what it needs (make test does) or "
                       "mark it")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not STRICT:
        return
    if hasattr(report, "wasxfail"):                      # xfailed (skipped) or xpassed (passed)
        what = "xfailed" if report.skipped else "passed although marked xfail"
        reason = report.wasxfail
        del report.wasxfail
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} {what} under CI=true ({reason or 'no reason given'}); an expected "
                           "failure is a known gap, not a pass: fix it, or remove the test")
    elif report.skipped and (item.get_closest_marker("gpu") is None or not GPU_REASON.search(_skip_reason(report))):
        _strict_failure(report, item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped:
        _strict_failure(report, collector.nodeid)


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

