"""The topology a production stack grows into (Prefect's "scale self-hosted" layout): two Prefect API
server processes (``prefect server start --no-services``) on one PostgreSQL database, Prefect's background
services in a process of their own (``prefect server services start``), Prefect's Redis messaging
(prefect-redis: broker, cache, causal ordering, lease storage, Docket) between them, a load balancer in
front (tests/failover_proxy.py: round robin, skips a dead server), prefect.yaml's deployments and one
process worker per pool (kdm-cpu, kdm-gpu), every process with docker/compose.yaml's server or worker
settings (auth string, CSRF). A smoke-sized ``kdm/distill-checkerboard`` run is started with
``prefect deployment run``; once its first stage is recorded, one API server is killed (SIGKILL, its
whole process group), and the run must still complete with every stage, artifact and event recorded."""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

from failover_proxy import FailoverProxy
from prefect_server import (PREFECT, Api, compose_client_settings, compose_server_settings, start, stop, tail,
                            wait_healthy)
from s3_server import free_port
from services import REDIS_HOST, REDIS_PORT, postgres_database, postgres_databases, redis_database

REPO = Path(__file__).resolve().parents[1]
DEPLOYMENT = "kdm/distill-checkerboard"
STAGES = ("teacher", "pairs", "filter", "student", "evaluation")
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def scaled_settings(redis_db: int) -> dict:
    """What Prefect's self-hosted scaling guide adds to a server's settings (every API server and the
    services process): Redis messaging, cache, causal ordering, lease storage and Docket; migrations are
    run once beforehand, not by each server as it starts."""
    return {"PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
            "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
            "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
            "PREFECT_REDIS_MESSAGING_HOST": REDIS_HOST, "PREFECT_REDIS_MESSAGING_PORT": str(REDIS_PORT),
            "PREFECT_REDIS_MESSAGING_DB": str(redis_db),
            "PREFECT_SERVER_DOCKET_URL": f"redis://{REDIS_HOST}:{REDIS_PORT}/{redis_db}",
            "PREFECT_API_DATABASE_MIGRATE_ON_START": "false"}


def cli(env: dict, *args: str, timeout: float = 300) -> str:
    res = subprocess.run([PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"prefect {' '.join(args)} exited with {res.returncode}:\n{res.stdout[-3000:]}\n" \
                                f"{res.stderr[-3000:]}"
    return res.stdout


def logs_of(procs: dict) -> str:
    return "\n".join(f"--- {name}\n{tail(log)}" for name, (_, log) in procs.items())


def wait_for(what: str, check, procs: dict, timeout: float, every: float = 1.0, detail=lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s {detail()}\n{logs_of(procs)}")
        time.sleep(every)


def refuses(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def task_runs(api: Api, flow_run_id: str) -> list[dict]:
    return api.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}, "limit": 200})


@pytest.mark.slow
def test_a_checkerboard_run_completes_while_one_of_two_api_servers_is_killed(tmp_path):
    import redis
    auth = f"kdm-admin:{secrets.token_hex(24)}"
    procs: dict = {}                       # name -> (process, log)
    with postgres_database() as db, redis_database() as redis_db:
        ports = [free_port(), free_port()]
        with FailoverProxy([("127.0.0.1", p) for p in ports]) as proxy:
            base_env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
            base_env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), DO_NOT_TRACK="1")
            server = compose_server_settings(db, auth, f"{proxy.url}/api") | scaled_settings(redis_db)
            server_env = base_env | server
            client_env = base_env | compose_client_settings(auth) | {
                "PREFECT_API_URL": f"{proxy.url}/api", "KDM_REPO": str(REPO), "KDM_ALLOWED_ROOTS": str(tmp_path),
                "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_HEARTBEAT_SECONDS": "5", "OMP_NUM_THREADS": "1",
                "MKL_NUM_THREADS": "1"}
            api = Api(proxy.url, auth)
            try:
                cli(server_env, "server", "database", "upgrade", "-y")
                # One API server after the other: two started at the same moment on a fresh database race
                # to register Prefect's block types, and one exits (duplicate key "uq_block_type__slug").
                for name, port in zip(("api-a", "api-b"), ports):
                    log = tmp_path / f"{name}.log"
                    procs[name] = (start([PREFECT, "server", "start", "--no-services", "--host", "127.0.0.1",
                                          "--port", str(port)], server_env, log), log)
                    if name == "api-b":
                        log = tmp_path / "services.log"
                        procs["services"] = (start([PREFECT, "server", "services", "start"], server_env, log), log)
                    wait_healthy(procs[name][0], f"http://127.0.0.1:{port}", procs[name][1])

                for pool in ("kdm-cpu", "kdm-gpu"):
                    api.post("/work_pools/", {"name": pool, "type": "process"})
                api.ok("PATCH", "/work_pools/kdm-gpu", {"concurrency_limit": 1})
                cli(client_env, "--no-prompt", "deploy", "--name", "distill-checkerboard", "--name", "gpu-stage")
                for pool in ("kdm-cpu", "kdm-gpu"):   # outside the checkout: the pull step moves runs to $KDM_REPO
                    log = tmp_path / f"worker-{pool}.log"
                    procs[pool] = (start([PREFECT, "worker", "start", "--pool", pool, "--type", "process",
                                          "--name", f"ha-{pool}"], client_env, log, cwd=tmp_path), log)

                root = tmp_path / "root"
                out = cli(client_env, "deployment", "run", DEPLOYMENT, "--param", "preset=smoke",
                          "--param", f"root={root}")
                run_id = next(ln.split("UUID:")[1].strip() for ln in out.splitlines() if "UUID:" in ln)

                # As soon as the worker's flow run process has set the run RUNNING (a smoke run then takes
                # about 10 s: every stage, its events and the report), kill the API server holding more open
                # connections, with every process it started: the rest of the run has one API server left.
                def running_or_over():
                    state = (api.get(f"/flow_runs/{run_id}")["state"] or {}).get("type")
                    return state in {"RUNNING", *TERMINAL} and state
                state = wait_for("the run running", running_or_over, procs, timeout=300, every=0.25)
                assert state == "RUNNING", f"the run was {state} before the kill\n{logs_of(procs)}"
                at_kill = proxy.snapshot()
                victim = max((0, 1), key=lambda i: at_kill[i]["active"])
                name = ("api-a", "api-b")[victim]
                killed_at = datetime.now(timezone.utc)
                os.killpg(procs[name][0].pid, signal.SIGKILL)
                assert procs[name][0].wait(timeout=30) == -signal.SIGKILL
                wait_for(f"{name}'s port closed", lambda: refuses(ports[victim]), procs, timeout=30, every=0.05)
                proxy.mark()                        # from here on, no connection can reach the victim

                def finished():
                    run = api.get(f"/flow_runs/{run_id}")
                    return (run["state"] or {}).get("type") in TERMINAL and run
                fr = wait_for("the flow run finished", finished, procs, timeout=600, every=2)
                after_run = proxy.snapshot()
                survivor = 1 - victim
                assert fr["state"]["type"] == "COMPLETED", f"{fr['state']}\n{logs_of(procs)}"

                # the run: every stage a completed task run (task run states arrive as events, which the
                # services process records: allow it a moment), nothing crashed, its artifacts and outputs there
                seen: dict = {}

                def stages_recorded():
                    tasks = {t["name"].split("-")[0]: t for t in task_runs(api, run_id)}
                    seen.update({s: (tasks.get(s, {}).get("state") or {}).get("type") for s in STAGES})
                    return set(seen.values()) == {"COMPLETED"} and tasks
                tasks = wait_for("every stage recorded as a completed task run", stages_recorded, procs,
                                 timeout=120, every=2, detail=lambda: f"(task run states: {seen})")
                assert datetime.fromisoformat(tasks["evaluation"]["start_time"]) > killed_at   # the run went on
                assert datetime.fromisoformat(fr["end_time"]) > killed_at
                states = [s["type"] for s in api.get(f"/flow_run_states/?flow_run_id={run_id}")]
                assert "CRASHED" not in states and "FAILED" not in states, states
                arts = api.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
                keys = {a["key"] for a in arts if a["key"]}
                assert {"checkerboard-smoke-report", "checkerboard-smoke-metrics", "checkerboard-smoke-samples",
                        "checkerboard-smoke-student-link"} <= keys, keys
                report = next(a for a in arts if a["key"] == "checkerboard-smoke-report")["data"]
                assert "KDM distillation: checkerboard (smoke)" in report and "## Lineage" in report
                for kind in ("teachers", "pairs", "students", "evaluations"):
                    assert [p for p in (root / kind).iterdir() if not p.name.endswith(".partial")], kind
                assert len(list((root / "evaluations").glob("*/report.json"))) == 1
                assert not list(root.rglob("*.partial"))

                # the kill: the victim held connections, clients then went to the survivor only (the
                # victim's port refused them), which answers; the victim is down
                assert at_kill[victim]["active"] >= 1, at_kill
                assert after_run[victim]["opened_since_mark"] == 0 and after_run[survivor]["opened_since_mark"] > 0
                assert after_run[victim]["refused"] > at_kill[victim]["refused"], after_run
                assert at_kill[survivor]["opened"] > 0                      # both servers carried traffic
                assert httpx.get(f"http://127.0.0.1:{ports[survivor]}/api/health", timeout=5).status_code == 200
                with pytest.raises(httpx.ConnectError):
                    httpx.get(f"http://127.0.0.1:{ports[victim]}/api/health", timeout=5)

                # both workers still report to the API after the kill
                for pool in ("kdm-cpu", "kdm-gpu"):
                    def beat():
                        ws = api.post(f"/work_pools/{pool}/workers/filter", {"limit": 10})
                        return [w for w in ws if w["last_heartbeat_time"]
                                and datetime.fromisoformat(w["last_heartbeat_time"]) > killed_at]
                    [worker] = wait_for(f"a heartbeat of the {pool} worker after the kill", beat, procs, timeout=120)
                    assert worker["name"] == f"ha-{pool}" and worker["status"] == "ONLINE"

                # events went API server -> Redis -> the services process -> PostgreSQL
                def completed_event():
                    got = api.post("/events/filter", {"filter": {
                        "event": {"name": ["prefect.flow-run.Completed"]},
                        "resource": {"id": [f"prefect.flow-run.{run_id}"]}}, "limit": 5})["events"]
                    return got
                [ev] = wait_for("the run's Completed event persisted", completed_event, procs, timeout=60)
                r = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=redis_db)
                streams = [k.decode() for k in r.keys("*") if r.type(k) == b"stream"]
                assert "events" in streams and r.xinfo_stream("events")["entries-added"] > 0, streams
                [(state,)] = db.query("SELECT state_type::text FROM flow_run WHERE id = $1", uuid.UUID(run_id))
                assert state == "COMPLETED"
            finally:
                for name in ("kdm-cpu", "kdm-gpu", "services", "api-a", "api-b"):
                    if name in procs:
                        stop(procs[name][0])
        name_of_db = db.name
    assert name_of_db not in postgres_databases()                    # dropped
    r = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=redis_db)
    assert not r.exists("events")                                    # its Redis database flushed
