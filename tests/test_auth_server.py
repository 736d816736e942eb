"""A real ``prefect server start`` on 127.0.0.1 configured as the production stack configures it
(docker/compose.yaml's ``prefect-server`` environment: PostgreSQL, an auth string, CSRF protection) on a
PostgreSQL database of its own. Checked: which calls are refused without (or with wrong) credentials and
succeed with them, that the UI is told to prompt for them, that ``kdm teacher register`` emits its event
with PREFECT_API_AUTH_STRING and fails loudly without it, and that a process worker with the string runs
flow runs whose checks (pipeline.access) refuse forged ``kdm.teacher.registered`` events (delivered by the
trigger's automation) and parameters outside its KDM_ALLOWED_ROOTS before any work."""
from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import httpx
import pytest

from prefect_server import PREFECT, Api, production_server, start, stop, tail
from test_registry import kdm_teacher

REPO = Path(__file__).resolve().parents[1]
AUTH = f"kdm-admin:{secrets.token_urlsafe(18)}"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
SERVER_ONLY = ("PREFECT_SERVER_API_AUTH_STRING", "PREFECT_SERVER_CSRF_PROTECTION_ENABLED")


def client_env(env: dict, auth: str | None = AUTH, **extra) -> dict:
    """The environment of a client process: the server's own settings removed, the auth string added."""
    out = {k: v for k, v in env.items() if k not in SERVER_ONLY and k != "PREFECT_API_AUTH_STRING"}
    out.update(PYTHONPATH=str(REPO), **extra)
    if auth is not None:
        out["PREFECT_API_AUTH_STRING"] = auth
    return out


def event(name: str, resource_id: str, payload: dict | None = None) -> dict:
    return {"id": str(uuid.uuid4()), "occurred": datetime.now(timezone.utc).isoformat(), "event": name,
            "resource": {"prefect.resource.id": resource_id}, "payload": payload or {}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-auth")
    with production_server(home, ui=True, auth=AUTH, PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false") as srv:
        yield srv.base, srv.env, home, srv.database


@pytest.fixture(scope="module")
def idle_deployment(server):
    """A deployment on a pool without a worker (its runs stay scheduled): (api, deployment id)."""
    base, _, _, _ = server
    api = Api(base, AUTH)
    flow_id = api.ok("POST", "/flows/", {"name": "kdm-auth-idle"})["id"]
    api.ok("POST", "/work_pools/", {"name": "kdm-auth-idle", "type": "process"})
    dep = api.ok("POST", "/deployments/", {"name": "idle", "flow_id": flow_id, "work_pool_name": "kdm-auth-idle",
                                            "entrypoint": "tests/access_probe_flow.py:probe"})
    return api, dep["id"]


def test_calls_without_the_auth_string_are_refused(idle_deployment, capsys):
    api, dep = idle_deployment
    calls = {"read deployments (POST /deployments/filter)": ("POST", "/deployments/filter", {"limit": 5}),
             "read a deployment (GET /deployments/{id})": ("GET", f"/deployments/{dep}", None),
             "create a flow run (POST /deployments/{id}/create_flow_run)":
                 ("POST", f"/deployments/{dep}/create_flow_run", {}),
             "emit an event (POST /events)": ("POST", "/events", [event("kdm.auth.probe", "kdm.test.probe")]),
             "get a CSRF token (GET /csrf-token)": ("GET", f"/csrf-token?client={uuid.uuid4()}", None)}
    token = api.csrf()
    variants = {"no credentials": dict(auth=None, csrf=None),
                "wrong auth string": dict(auth="kdm-admin:wrong", csrf=None),
                "CSRF token, no auth string": dict(auth=None, csrf=token),
                "CSRF token, wrong auth string": dict(auth="kdm-admin:wrong", csrf=token),
                "auth string, no CSRF token": dict(auth=AUTH, csrf=None),
                "auth string and CSRF token": dict(auth=AUTH, csrf=token)}
    matrix = {v: {c: api.call(m, p, b, **kw).status_code for c, (m, p, b) in calls.items()}
              for v, kw in variants.items()}
    with capsys.disabled():
        width = max(map(len, calls))
        print("\n" + " " * width + " | " + " | ".join(variants))
        for c in calls:
            print(c.ljust(width) + " | " + " | ".join(str(matrix[v][c]).center(len(v)) for v in variants))
    gets = [c for c, (m, _, _) in calls.items() if m == "GET"]
    posts = [c for c in calls if c not in gets]
    for v in ("no credentials", "wrong auth string"):
        assert all(matrix[v][c] == 401 for c in gets), matrix[v]
        assert all(matrix[v][c] == 403 for c in posts), matrix[v]    # the CSRF check runs first: 403
    for v in ("CSRF token, no auth string", "CSRF token, wrong auth string"):
        assert set(matrix[v].values()) == {401}, matrix[v]           # a valid CSRF token is not a credential
    assert all(matrix["auth string, no CSRF token"][c] == 200 for c in gets)
    assert all(matrix["auth string, no CSRF token"][c] == 403 for c in posts)
    assert matrix["auth string and CSRF token"] == dict(zip(calls, [200, 200, 201, 204, 200]))
    # the probes compose's healthcheck uses stay open; the UI is told to ask for the string and use CSRF
    assert api.call("GET", "/health").status_code == 200
    ui = httpx.get(api.api.removesuffix("/api") + "/ui-settings", timeout=30).json()
    assert ui["auth"] == "BASIC" and ui["csrf_enabled"] is True


def test_the_events_websocket_needs_the_auth_string(server):
    from prefect.events import Event
    from prefect.events.clients import PrefectEventsClient
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
    base, _, _, _ = server

    run = uuid.uuid4().hex[:12]
    refused, accepted = f"kdm.test.ws.refused-{run}", f"kdm.test.ws.accepted-{run}"

    async def emit(resource_id: str) -> None:
        async with PrefectEventsClient(api_url=f"{base}/api") as client:
            await client.emit(Event(event="kdm.auth.ws", resource={"prefect.resource.id": resource_id}))

    for wrong in (None, "kdm-admin:wrong"):
        with temporary_settings(updates={PREFECT_API_URL: f"{base}/api", PREFECT_API_AUTH_STRING: wrong}):
            with pytest.raises(Exception, match="(?i)unable to authenticate|401|1008|rejected"):
                asyncio.run(emit(refused))
    with temporary_settings(updates={PREFECT_API_URL: f"{base}/api", PREFECT_API_AUTH_STRING: AUTH}):
        asyncio.run(emit(accepted))
    api = Api(base, AUTH)
    got = _events(api, accepted)                  # the event sent with the auth string arrived, once
    assert [(e["event"], e["resource"]["prefect.resource.id"]) for e in got] == [("kdm.auth.ws", accepted)]
    assert _events(api, refused, timeout=2) == []   # and the refused ones never did


def _events(api: Api, resource_id: str, timeout: float = 30) -> list:
    deadline = time.monotonic() + timeout
    while True:
        got = api.ok("POST", "/events/filter", {"filter": {"resource": {"id": [resource_id]}}, "limit": 10})["events"]
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.5)


def kdm(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_kdm_teacher_register_sends_the_auth_string(server, tmp_path):
    base, env, _, _ = server
    api = Api(base, AUTH)
    root = tmp_path / "root"
    t = kdm_teacher(tmp_path / "t", seed=21)
    for auth, said in ((None, "refused no credentials (HTTP 401)"),
                       ("kdm-admin:wrong", "refused the auth string in PREFECT_API_AUTH_STRING (HTTP 401)")):
        res = kdm(client_env(env, auth), "teacher", "register", str(t), "--root", str(root), "--emit-again")
        assert res.returncode != 0, res.stdout + res.stderr
        assert said in res.stderr and "set PREFECT_API_AUTH_STRING" in res.stderr, res.stderr
    res = kdm(client_env(env), "teacher", "register", str(t), "--root", str(root), "--emit-again")
    assert res.returncode == 0 and "event kdm.teacher.registered emitted to" in res.stdout, res.stdout + res.stderr
    from pipeline.teachers.registry import list_teachers
    [rec] = list_teachers(str(root))
    rid = rec.id
    [ev] = _events(api, f"kdm.teacher.{rid}")
    assert ev["payload"]["teacher_uri"] == str(t.resolve())


def _runs(api: Api, deployment_id: str) -> list[dict]:
    return api.ok("POST", "/flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}}, "limit": 50})


def _wait(api: Api, deployment_id: str, n: int, log: Path, timeout: float = 300) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        runs = _runs(api, deployment_id)
        if len(runs) >= n and all(r["state"] and r["state"]["type"] in TERMINAL for r in runs):
            return runs
        if time.monotonic() > deadline:
            pytest.fail(f"{len(runs)} of {n} runs finished in {timeout:.0f} s: "
                        f"{[(r['name'], r['state'] and r['state']['type']) for r in runs]}\nworker log:\n{tail(log)}")
        time.sleep(1)


def _logs(api: Api, run_id: str, *needles: str, timeout: float = 60, worker_log: Optional[Path] = None) -> str:
    """The run's log messages; with ``needles``, once all of them are there (or the timeout passed): a run's
    last log records reach the API asynchronously, after its terminal state may already be set. With
    ``worker_log``, the run's lines of the process worker's output are appended: the flow run's console log
    says the same lines, and on a loaded machine Prefect may drop a batch it failed to ship ("Error logging
    to API"), so what the flow said is read from both."""
    deadline = time.monotonic() + timeout
    while True:
        logs = api.ok("POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200})
        text = "\n".join(lg["message"] for lg in logs)
        if worker_log is not None and worker_log.exists():
            name = api.ok("GET", f"/flow_runs/{run_id}")["name"]
            text += "\n" + "\n".join(line for line in worker_log.read_text(errors="replace").splitlines()
                                      if f"'{name}'" in line)
        if all(n in text for n in needles) or time.monotonic() > deadline:
            return text
        time.sleep(1)


@pytest.mark.slow
def test_a_worker_runs_guarded_flow_runs_and_forged_events_start_nothing(server, tmp_path):
    """prefect.yaml's trigger shape (event payload root and teacher_uri as parameters) on a deployment of the
    probe flow (tests/access_probe_flow.py) whose own root is root/; a process worker with the auth string
    and KDM_ALLOWED_ROOTS=tmp_path. One genuine registration, three forged events, one direct run with a
    root outside the allowed roots."""
    from prefect.cli.deploy._triggers import DeploymentTriggerAdapter
    base, env, home, database = server
    api = Api(base, AUTH)
    root, foreign = tmp_path / "root", tmp_path / "foreign"
    flow_id = api.ok("POST", "/flows/", {"name": "kdm-access-probe"})["id"]
    api.ok("POST", "/work_pools/", {"name": "kdm-auth-cpu", "type": "process"})
    dep = api.ok("POST", "/deployments/", {
        "name": "probe", "flow_id": flow_id, "work_pool_name": "kdm-auth-cpu",
        "entrypoint": "tests/access_probe_flow.py:probe", "parameters": {"root": str(root)},
        "pull_steps": [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]})["id"]
    trig = DeploymentTriggerAdapter.validate_python({
        "type": "event", "name": "probe on kdm.teacher.registered", "enabled": True,
        "match": {"prefect.resource.id": "kdm.teacher.*"}, "expect": ["kdm.teacher.registered"],
        "posture": "Reactive", "threshold": 1, "within": 0,
        "parameters": {"root": "{{ event.payload.root }}", "teacher_uri": "{{ event.payload.teacher_uri }}"}})
    trig.set_deployment_id(uuid.UUID(dep))
    api.ok("POST", "/automations/", json.loads(trig.as_automation().model_dump_json()))

    log = home / "worker.log"
    worker = start([PREFECT, "worker", "start", "--pool", "kdm-auth-cpu", "--type", "process", "--name", "auth-test"],
                   client_env(env, KDM_ALLOWED_ROOTS=str(tmp_path), PREFECT_WORKER_QUERY_SECONDS="1",
                              OMP_NUM_THREADS="1"), log, cwd=home)
    try:
        genuine = kdm_teacher(root / "teachers" / "genuine", seed=31)
        res = kdm(client_env(env), "teacher", "register", str(genuine), "--root", str(root))
        assert res.returncode == 0 and "emitted to" in res.stdout, res.stdout + res.stderr
        unregistered = kdm_teacher(root / "teachers" / "unregistered", seed=32)
        elsewhere = kdm_teacher(foreign / "teachers" / "t", seed=33)
        res = kdm(client_env(env), "teacher", "register", str(elsewhere), "--root", str(foreign), "--no-event")
        assert res.returncode == 0, res.stderr
        forged = {"unregistered teacher": {"root": str(root), "teacher_uri": str(unregistered)},
                  "foreign root": {"root": str(foreign), "teacher_uri": str(elsewhere)},
                  "outside the allowed roots": {"root": "/var/tmp/kdm-evil", "teacher_uri": "s3://evil/teacher"}}
        for i, payload in enumerate(forged.values()):
            api.ok("POST", "/events", [event("kdm.teacher.registered", f"kdm.teacher.forged-{i}", payload)])
        direct = api.ok("POST", f"/deployments/{dep}/create_flow_run", {"parameters": {"root": "/var/tmp/elsewhere"}})
        runs = _wait(api, dep, 5, log)
    finally:
        stop(worker)
    assert len(runs) == 5, [r["parameters"] for r in runs]
    by_teacher = {r["parameters"].get("teacher_uri"): r for r in runs if r["id"] != direct["id"]}
    ok = by_teacher[str(genuine)]
    assert ok["state"]["type"] == "COMPLETED", _logs(api, ok["id"])
    assert ok["created_by"]["type"] == "AUTOMATION"
    assert "checks passed: kdm-" in _logs(api, ok["id"], "checks passed: kdm-", worker_log=log)
    expect = {"unregistered teacher": "is not registered under root",
              "foreign root": "is not this deployment's artifact root",
              "outside the allowed roots": "is outside the artifact roots this worker may use"}
    for what, payload in forged.items():
        run = by_teacher[payload["teacher_uri"]]
        logs = _logs(api, run["id"], "refused before any work", expect[what], worker_log=log)
        assert run["state"]["type"] == "FAILED", (what, run["state"], logs)
        assert expect[what] in (run["state"]["message"] or ""), (what, run["state"])
        assert "refused before any work" in logs and expect[what] in logs, (what, logs)
        assert "checks passed" not in logs
    run = next(r for r in runs if r["id"] == direct["id"])
    logs = _logs(api, run["id"], "root /var/tmp/elsewhere is outside the artifact roots", worker_log=log)
    assert run["state"]["type"] == "FAILED" and "root /var/tmp/elsewhere is outside the artifact roots" in logs, logs
    assert not (foreign / "registry" / "students").exists() and not Path("/var/tmp/kdm-evil").exists()
    # the server keeps them in its PostgreSQL database (compose's backend), the automation's too
    stored = database.query("SELECT id::text, created_by->>'type' FROM flow_run WHERE deployment_id = $1",
                            uuid.UUID(dep))
    assert sorted(stored) == sorted((r["id"], (r["created_by"] or {}).get("type")) for r in runs)
    assert sum(t == "AUTOMATION" for _, t in stored) == 4
