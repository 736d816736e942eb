"""A deployment run as a user starts it, measured: Prefect server, both pools with one worker each,
``prefect deploy --all``, then ``prefect deployment run kdm/distill-cifar10 --param preset=... --watch``.

Prints (and writes with --out) a JSON record: the device, every stage's wall time (the parent's tasks and the
``gpu-stage`` runs on kdm-gpu), the FD ratio and MSE of the evaluation, the artifact keys the server holds
(report, table, grids, progress) and the deployment list. On a GPU machine::

    python bench/deployment_run.py --preset mini --out docs/bench/deployment-mini.json

On the CPU, the same path at smoke size (a few minutes)::

    python bench/deployment_run.py --preset smoke --params '{"teacher": {"steps": 4}, "student": {"train": {"steps": 4}}}'
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
PREFECT = str(Path(sys.executable).parent / "prefect")
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
STAGE_NAMES = {"dataset", "extractor", "perceptual", "teacher", "pairs", "filter", "student", "evaluation", "publish"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefect(env: dict, *args: str, check: bool = True, timeout: float = 600) -> str:
    res = subprocess.run([PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise SystemExit(f"prefect {' '.join(args)} exited with {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res.stdout + res.stderr


def background(args: list[str], env: dict, log: Path, cwd: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def seconds(run: dict) -> float | None:
    if run.get("start_time") and run.get("end_time"):
        a, b = (datetime.fromisoformat(run[k].replace("Z", "+00:00")) for k in ("start_time", "end_time"))
        return round((b - a).total_seconds(), 1)
    return None


def device_name() -> str:
    try:
        import torch
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception as e:  # noqa: BLE001 (a benchmark record says what it could not read)
        return f"unknown ({e})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deployment", default="kdm/distill-cifar10")
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--params", default="{}", help="--params JSON of `prefect deployment run` (overrides)")
    ap.add_argument("--root", default=None, help="artifact root (default: a fresh temporary directory)")
    ap.add_argument("--gpus", type=int, default=1, help="concurrency limit of pool kdm-gpu")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--out", default=None, help="write the JSON record here too")
    a = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="kdm-deployment-run-"))
    root = a.root or str(home / "artifacts")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home / "prefect"), PREFECT_SERVER_API_HOST="127.0.0.1",
               PREFECT_SERVER_API_PORT=str(port), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false", KDM_REPO=str(REPO),
               PREFECT_WORKER_QUERY_SECONDS="2")
    procs = [background([PREFECT, "server", "start"], env, home / "server.log", home)]
    env["PREFECT_API_URL"] = api
    t0 = time.time()
    try:
        for _ in range(180):
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            raise SystemExit(f"the Prefect server did not start; see {home / 'server.log'}")
        prefect(env, "work-pool", "create", "kdm-cpu", "--type", "process")
        prefect(env, "work-pool", "create", "kdm-gpu", "--type", "process")
        prefect(env, "work-pool", "set-concurrency-limit", "kdm-gpu", str(a.gpus))
        prefect(env, "--no-prompt", "deploy", "--all")
        deployments = prefect(env, "deployment", "ls")
        for pool in ("kdm-cpu", "kdm-gpu"):
            procs.append(background([PREFECT, "worker", "start", "--pool", pool, "--type", "process"], env,
                                    home / f"worker-{pool}.log", home))
        params = json.dumps({"preset": a.preset, "root": root, **json.loads(a.params)})
        t_run = time.time()
        out = prefect(env, "deployment", "run", a.deployment, "--params", params, "--watch",
                      "--watch-timeout", str(int(a.timeout)), check=False, timeout=a.timeout + 60)
        run_s = round(time.time() - t_run, 1)
        line = next((ln for ln in out.splitlines() if "UUID:" in ln), "")
        run_id = line.split("UUID:")[-1].strip()
        if not run_id:
            raise SystemExit(f"prefect deployment run printed no flow run id:\n{out[-3000:]}")
        parent = httpx.get(f"{api}/flow_runs/{run_id}", timeout=30).json()
        children = httpx.post(f"{api}/flow_runs/filter", json={"flow_runs": {"parent_flow_run_id": {
            "any_": [run_id]}}, "limit": 200}, timeout=30).json()
        tasks = httpx.post(f"{api}/task_runs/filter", json={"task_runs": {"flow_run_id": {"any_": [run_id]}},
                                                            "limit": 200}, timeout=30).json()
        arts = httpx.post(f"{api}/artifacts/filter", json={"artifacts": {"flow_run_id": {
            "any_": [run_id] + [c["id"] for c in children]}}}, timeout=30).json()
        result = {}
        report = next((x for x in arts if (x.get("key") or "").endswith("-metrics")), None)
        if report is not None:
            rows = report["data"] if isinstance(report["data"], list) else json.loads(report["data"])
            result = {f"{r['metric']} {r['subject']}": r["value"] for r in rows}
        record = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device_name(),
            "command": f"prefect deployment run {a.deployment} --params '{params}' --watch",
            "state": (parent.get("state") or {}).get("type"), "run_seconds": run_s,
            "setup_seconds": round(t_run - t0, 1),
            # the parent's own stage tasks (named <stage>-<id>; the tasks that track subflow runs are left
            # out) and the gpu-stage runs (named <stage>-<version>), in the order they started
            "stages": {x["name"]: {"pool": x.get("work_pool_name") or "kdm-cpu (task of the flow)",
                                   "seconds": seconds(x), "state": (x.get("state") or {}).get("type")}
                       for x in sorted([t for t in tasks if t["name"].split("-")[0] in STAGE_NAMES] + children,
                                       key=lambda x: x.get("start_time") or "")},
            "metrics": result,
            "artifacts": sorted({f"{x['type']}:{x.get('key') or '-'}" for x in arts}),
            "deployments": [ln.strip() for ln in deployments.splitlines() if "/" in ln],
        }
        text = json.dumps(record, indent=2)
        print(text)
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(text + "\n")
        return 0 if record["state"] == "COMPLETED" else 1
    finally:
        for p in reversed(procs):
            stop(p)
        if not a.root:
            shutil.rmtree(home / "artifacts", ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
