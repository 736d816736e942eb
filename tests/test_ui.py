"""The Prefect UI shows a checkerboard run's artifacts: a real `prefect server start` (UI enabled) on a
free 127.0.0.1 port, configured as docker/compose.yaml configures it (PostgreSQL, auth string, CSRF
protection; tests/prefect_server.py), a smoke-sized `kdm` flow run against it, and headless Chromium
rendering the flow run's Artifacts tab, the artifacts page and the report artifact (screenshots +
rendered DOM), logged in as the UI's login form does it (the auth string in the browser's local storage).
And the UI's "Retry" of a failed deployment run (the state change the UI sends) re-runs it with the same
parameters: the finished stages are skipped.

``KDM_UI_SCREENSHOTS=DIR`` keeps the screenshots in DIR (the README's docs/ui-artifacts.png is the
flow run page's).
"""
import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from prefect_server import Api, production_server, tail as _tail

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
needs_chromium = pytest.mark.usefixtures("chromium_installed")


@pytest.fixture
def chromium_installed():
    """make test installs Debian's chromium (as root); its absence fails the test, it is never skipped."""
    if CHROMIUM is None:
        pytest.fail("headless Chromium is not installed: `make test` installs it as root, or run "
                    "`sudo apt-get install chromium`")


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WINDOW = (1400, 1000)


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory):
    """``prefect server start`` with the UI, its own PREFECT_HOME, UI static directory and PostgreSQL
    database; its clients may use the test's temporary directories (KDM_ALLOWED_ROOTS)."""
    home = tmp_path_factory.mktemp("prefect-ui")
    with production_server(home, ui=True) as srv:
        add_login_page(home / "ui", srv.auth)
        yield srv._replace(env=srv.env | {"KDM_ALLOWED_ROOTS": str(tmp_path_factory.getbasetemp())})


LOGIN_PAGE = "kdm-test-login.html"


def add_login_page(static_root: Path, auth: str) -> None:
    """A page in each served UI bundle that does what the UI's login form does with the auth string (stores
    it base64-encoded under ``prefect-password`` in local storage) and then opens the page named after ``#``."""
    page = ("<!doctype html><meta charset='utf-8'><script>"
            f"localStorage.setItem('prefect-password', '{base64.b64encode(auth.encode()).decode()}');"
            "location.replace(decodeURIComponent(location.hash.slice(1)));</script>")
    bundles = [d for d in (static_root, *static_root.iterdir()) if (d / "UI_SERVE_BASE").is_file()]
    assert bundles, f"no UI bundle under {static_root}"
    for d in bundles:
        (d / LOGIN_PAGE).write_text(page)


def logged_in(url: str) -> str:
    """``url`` opened through the login page of its UI (same origin, so the same local storage)."""
    from urllib.parse import quote, urlsplit
    parts = urlsplit(url)
    ui_root = _ui_base(f"{parts.scheme}://{parts.netloc}")
    assert url.startswith(ui_root + "/"), (url, ui_root)
    return f"{ui_root}/{LOGIN_PAGE}#{quote(url, safe='')}"


@pytest.fixture(scope="module")
def flow_run(ui_server, tmp_path_factory):
    """A smoke-sized `kdm` flow run reported to the UI server: (flow run id, its name, its artifacts)."""
    base, env = ui_server.base, ui_server.env
    root = tmp_path_factory.mktemp("ui-artifacts")
    code = ("import json\nfrom flows.kdm import kdm\n"
            f"state = kdm(recipe='checkerboard', preset='smoke', root='{root}', return_state=True)\n"
            "assert state.is_completed(), state\n"
            "print('KDM_FLOW_RUN=' + json.dumps({'id': str(state.state_details.flow_run_id), "
            "'student': state.result()['student']['version']}))\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env | {"PREFECT_API_URL": f"{base}/api"},
                         capture_output=True, text=True, timeout=600)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("KDM_FLOW_RUN=")), None)
    assert res.returncode == 0 and line, \
        f"flow run failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    run = json.loads(line.removeprefix("KDM_FLOW_RUN="))
    api = ui_server.api
    name = api.get(f"/flow_runs/{run['id']}")["name"]
    arts = api.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
    return run | {"name": name, "artifacts": arts}


def _ui_base(base: str) -> str:
    """The base URL of the UI the server serves by default (``/v2`` for Prefect's new UI, else ``/``)."""
    s = httpx.get(f"{base}/ui-settings", timeout=10).json()
    path = s.get(f"{s.get('default_ui', 'v1')}_base_url") or "/"
    return base + path.rstrip("/")


def chromium(url: str, tmp: Path, *flags: str) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{time.monotonic_ns()}"
    res = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=15000",
                          *flags, url], capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, f"chromium exited with {res.returncode} on {url}:\n{res.stderr[-2000:]}"
    return res


def screenshot(url: str, tmp: Path, name: str) -> Path:
    path = tmp / f"{name}.png"
    chromium(logged_in(url), tmp, f"--screenshot={path}", f"--window-size={WINDOW[0]},{WINDOW[1]}")
    keep = os.environ.get("KDM_UI_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / path.name)
    return path


def dump_dom(url: str, tmp: Path) -> str:
    return chromium(logged_in(url), tmp, "--dump-dom").stdout


def assert_rendered_png(path: Path) -> None:
    from PIL import Image
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    Image.open(io.BytesIO(data)).verify()                       # CRCs and structure
    img = Image.open(io.BytesIO(data)).convert("RGB")
    assert img.size == WINDOW
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50, f"{path} has only {len(colours)} colours: a blank page"
    lo, hi = img.convert("L").getextrema()
    assert hi - lo > 100, f"{path} has no contrast (grey levels {lo}..{hi}): a blank page"


@needs_chromium
def test_flow_run_page_shows_the_runs_artifacts(ui_server, flow_run, tmp_path):
    base = ui_server.base
    keys = sorted(a["key"] for a in flow_run["artifacts"] if a["key"])
    assert {"checkerboard-smoke-report", "checkerboard-smoke-metrics", "checkerboard-smoke-samples",
            "checkerboard-smoke-student-link"} <= set(keys)
    url = f"{_ui_base(base)}/runs/flow-run/{flow_run['id']}?tab=Artifacts"
    assert_rendered_png(screenshot(url, tmp_path, "ui-artifacts"))
    dom = dump_dom(url, tmp_path)
    assert flow_run["name"] in dom
    missing = [k for k in keys if k not in dom]
    assert not missing, f"the flow run page does not show the artifacts {missing}"


@needs_chromium
def test_artifacts_page_lists_every_artifact_key_of_the_run(ui_server, flow_run, tmp_path):
    base = ui_server.base
    url = f"{_ui_base(base)}/artifacts"
    assert_rendered_png(screenshot(url, tmp_path, "ui-artifacts-page"))
    dom = dump_dom(url, tmp_path)
    missing = [a["key"] for a in flow_run["artifacts"] if a["key"] and a["key"] not in dom]
    assert not missing, f"the artifacts page does not list {missing}"
    # a browser without the auth string gets the UI's login form, and none of the run's artifacts
    anonymous = chromium(url, tmp_path, "--dump-dom").stdout
    assert "Login" in anonymous and 'placeholder="admin:pass"' in anonymous, anonymous[-2000:]
    assert not [a["key"] for a in flow_run["artifacts"] if a["key"] and a["key"] in anonymous]


@needs_chromium
def test_report_artifact_renders_lineage_metrics_and_plots(ui_server, flow_run, tmp_path):
    base = ui_server.base
    report = next(a for a in flow_run["artifacts"] if a["key"] == "checkerboard-smoke-report")
    url = f"{_ui_base(base)}/artifacts/artifact/{report['id']}"
    assert_rendered_png(screenshot(url, tmp_path, "ui-report"))
    dom = dump_dom(url, tmp_path)
    assert "KDM distillation: checkerboard (smoke)" in dom and "Lineage" in dom and "Metrics" in dom
    assert flow_run["student"] in dom
    assert "student (1 NFE)" in dom and "teacher x_0" in dom          # the metrics table, rendered
    for plot in ("samples", "noise_structure_student", "noise_structure_teacher", "frontier"):
        assert f'alt="{plot}" src="data:image/png;base64,' in dom, plot


# --- "Retry" of a failed run ----------------------------------------------------------------------

SERVE = """
from flows.kdm import kdm
kdm.serve(name="retry-check", print_starting_message=False)
"""


def _wait_state(api: Api, flow_run_id: str, types: set, timeout: float = 400) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fr = api.get(f"/flow_runs/{flow_run_id}")
        if fr["state"] and fr["state"]["type"] in types:
            return fr
        time.sleep(1)
    pytest.fail(f"flow run {flow_run_id} did not reach {types} within {timeout:.0f} s (last state: {fr['state']})")


def _logs(api: Api, flow_run_id: str) -> list[str]:
    logs = api.post("/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200,
                                     "sort": "TIMESTAMP_ASC"})
    return [log["message"] for log in logs]


def _wait_logs(api: Api, flow_run_id: str, until, timeout: float = 60) -> list[str]:
    """The run's log messages once one satisfies ``until`` (a run's process ships its last lines as it
    exits, after its final state is set); all of them after ``timeout`` seconds otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        logs = _logs(api, flow_run_id)
        if any(until(m) for m in logs) or time.monotonic() > deadline:
            return logs
        time.sleep(1)


def test_retry_of_a_failed_deployment_run_skips_its_finished_stages(ui_server, tmp_path):
    """The run fails in its evaluation stage (a file stands where the evaluations directory goes); once
    that is fixed, the UI's Retry (state AwaitingRetry, as the flow run menu sends it) runs the same flow
    run again with the same parameters: every finished stage is skipped and the evaluation completes."""
    from pipeline import presets
    env, api = ui_server.env, ui_server.api
    root = tmp_path / "root"
    root.mkdir()
    (root / "evaluations").write_text("not a directory")
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        served = subprocess.Popen([sys.executable, "-c", SERVE], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                  env=env | {"PREFECT_RUNNER_POLL_FREQUENCY": "1"},
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (deps := api.post("/deployments/filter", {"deployments": {"name": {"any_": ["retry-check"]}}})):
            assert served.poll() is None, f"kdm.serve exited with {served.returncode}:\n{_tail(log)}"
            assert time.monotonic() < deadline, f"the deployment was not registered within 180 s:\n{_tail(log)}"
            time.sleep(1)
        params = {"config": presets.load("distill", "smoke", sets=[f"root={root}"]).model_dump(mode="json")}
        fr = api.post(f"/deployments/{deps[0]['id']}/create_flow_run", {"parameters": params})
        failed = _wait_state(api, fr["id"], {"FAILED", "CRASHED", "COMPLETED"})
        assert failed["state"]["type"] == "FAILED", f"{failed['state']}\n{_tail(log)}"
        first_logs = _wait_logs(api, fr["id"], lambda m: m.startswith("Finished in state Failed"))
        assert any(m.startswith("teacher ") and m.endswith(" done") for m in first_logs), first_logs
        assert not any(m.endswith("(exists, skipped)") for m in first_logs), first_logs

        (root / "evaluations").unlink()                         # the cause of the failure is fixed
        r = api.request("POST", f"/flow_runs/{fr['id']}/set_state", {
            "state": {"type": "SCHEDULED", "name": "AwaitingRetry", "message": "Retry from the UI"}, "force": True})
        assert r.status_code in (200, 201), r.text
        done = _wait_state(api, fr["id"], {"COMPLETED", "FAILED", "CRASHED"})
        assert done["state"]["type"] == "COMPLETED", f"{done['state']}\n{_tail(log)}"
        assert done["parameters"] == params and done["run_count"] == 2
        logs = _wait_logs(api, fr["id"], lambda m: m.startswith("student ") and m.endswith("(exists, skipped)"))
        skipped = [m for m in logs if m.endswith("(exists, skipped)")]
        assert {m.split()[0] for m in skipped} == {"teacher", "pairs", "filter", "student"}, logs
        assert len(list((root / "evaluations").glob("eval-*/report.json"))) == 1
    finally:
        if served.poll() is None:
            os.killpg(served.pid, signal.SIGTERM)
            try:
                served.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(served.pid, signal.SIGKILL)
                served.wait()


# --- the cifar10 recipe's report -------------------------------------------------------------------

CIFAR_TINY = {"dataset": {"archive": None}, "teacher": {"steps": 4, "preview_samples": 0},
              "student": {"train": {"steps": 4}},
              "pairs": {"seeds": {"start": 0, "stop": 32}, "heldout_seeds": {"start": 32, "stop": 48}, "chunk_size": 16},
              "filter": {"neighbours": 4, "candidates": 8, "calibration_samples": 6, "grid_size": 4}}


@pytest.fixture(scope="module")
def cifar_run(ui_server, tmp_path_factory):
    """A `kdm/distill-cifar10`-shaped run (recipe cifar10, preset smoke, a tiny synthetic archive) reported
    to the UI server: (flow run id, its artifacts, the summaries)."""
    import numpy as np
    from image_fixtures import image_folder, write_archive
    base, env = ui_server.base, ui_server.env
    d = tmp_path_factory.mktemp("ui-cifar")
    members, _ = image_folder(np.random.default_rng(0), per_class={"train": 8, "test": 2}, size=32)
    params = json.loads(json.dumps(CIFAR_TINY))
    params["dataset"]["archive"] = str(write_archive(d / "tiny-cifar.tgz", members))
    code = ("import json, sys\nimport torch\ntorch.set_num_threads(1)\nfrom flows.kdm import kdm\n"
            "p = json.loads(sys.argv[1])\n"
            f"state = kdm(recipe='cifar10', preset='smoke', root='{d / 'root'}', **p, return_state=True)\n"
            "assert state.is_completed(), state\n"
            "r = state.result()\n"
            "print('KDM_FLOW_RUN=' + json.dumps({'id': str(state.state_details.flow_run_id), "
            "'student': r['student']['version'], 'filter': r['filter']['version'], 'fd_ratio': r['evaluation']['fd_ratio']}))\n")
    res = subprocess.run([sys.executable, "-c", code, json.dumps(params)], cwd=REPO,
                         env=env | {"PREFECT_API_URL": f"{base}/api"}, capture_output=True, text=True, timeout=900)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("KDM_FLOW_RUN=")), None)
    assert res.returncode == 0 and line, \
        f"flow run failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    run = json.loads(line.removeprefix("KDM_FLOW_RUN="))
    arts = ui_server.api.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
    return run | {"artifacts": arts}


@needs_chromium
def test_cifar10_report_renders_lineage_metrics_and_grids(ui_server, cifar_run, tmp_path):
    base = ui_server.base
    keys = {a["key"] for a in cifar_run["artifacts"] if a["key"]}
    [report] = [a for a in cifar_run["artifacts"] if (a["key"] or "").endswith("-report")]
    prefix = report["key"].removesuffix("-report")
    assert prefix.startswith("cifar10-")
    assert {f"{prefix}-metrics", f"{prefix}-teacher-student", f"{prefix}-student-samples", f"{prefix}-filter-link",
            f"{prefix}-student-link"} <= keys
    url = f"{_ui_base(base)}/artifacts/artifact/{report['id']}"
    assert_rendered_png(screenshot(url, tmp_path, "ui-cifar10-report"))
    dom = dump_dom(url, tmp_path)
    assert "KDM distillation: CIFAR-10 (smoke)" in dom and "Lineage" in dom and "Metrics" in dom
    assert cifar_run["student"] in dom and cifar_run["filter"] in dom          # lineage names both versions
    assert "FD ratio student / teacher" in dom and f"{cifar_run['fd_ratio']:.3f}" in dom
    assert "not FID" in dom                                                     # the offline metric says so
    for grid in ("teacher_student", "student_samples"):
        assert f'alt="{grid}" src="data:image/png;base64,' in dom, grid
