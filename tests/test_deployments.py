"""The CIFAR-10 deployments across the two work pools, end to end: a real Prefect server configured as
docker/compose.yaml configures it (PostgreSQL, auth string, CSRF protection; tests/prefect_server.py), the
process pools kdm-cpu and kdm-gpu (concurrency limit 1), the deployments of prefect.yaml registered with
``prefect --no-prompt deploy --all`` and one process worker per pool, every client with compose's worker
settings (the auth string) and KDM_ALLOWED_ROOTS. ``kdm/distill-cifar10``
runs a tiny smoke configuration on pool kdm-cpu and starts each GPU stage as a run of
``gpu-stage/gpu-stage`` on pool kdm-gpu; a second run with the same parameters dispatches nothing."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from image_fixtures import image_folder, write_archive
from prefect_server import PREFECT, Api, production_server, start, stop, tail
from storage_schemas.distill_image import DistillImageConfig

REPO = Path(__file__).resolve().parents[1]
DEPLOYMENT = "kdm/distill-cifar10"
# The GPU stages of a device=cpu run (the smoke extractor runs on cpu, in the parent flow).
GPU_STAGES = ("teacher", "pairs", "student", "evaluation")
STAGES = ("dataset", "extractor", "teacher", "pairs", "filter", "student", "evaluation")
KINDS = dict(dataset="datasets", extractor="extractors", teacher="teachers", pairs="pairs", filter="pairs",
             student="students", evaluation="evaluations")
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def cli(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def ok(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 0, f"{res.args} exited with {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    """(API, environment, worker logs): server, pools, deployments and one worker per pool."""
    home = tmp_path_factory.mktemp("prefect-deployments")
    # no scheduler: the hourly redistill deployment must not start runs during the test
    with production_server(home, PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false") as srv:
        env = srv.env | {"KDM_REPO": str(REPO), "PREFECT_WORKER_QUERY_SECONDS": "1", "OMP_NUM_THREADS": "1",
                         "MKL_NUM_THREADS": "1", "KDM_ALLOWED_ROOTS": str(tmp_path_factory.getbasetemp())}
        ok(cli(env, "work-pool", "create", "kdm-cpu", "--type", "process"))
        ok(cli(env, "work-pool", "create", "kdm-gpu", "--type", "process"))
        ok(cli(env, "work-pool", "set-concurrency-limit", "kdm-gpu", "1"))
        ok(cli(env, "--no-prompt", "deploy", "--all"))
        workers, logs = [], {}
        try:        # outside the checkout: the pull step moves each flow run to $KDM_REPO
            for pool in ("kdm-cpu", "kdm-gpu"):
                logs[pool] = home / f"worker-{pool}.log"
                workers.append(start([PREFECT, "worker", "start", "--pool", pool, "--type", "process",
                                      "--name", f"test-{pool}"], env, logs[pool], cwd=home))
            yield srv.api, env, logs
        finally:
            for w in workers:
                stop(w)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> str:
    """A synthetic CIFAR-like ImageFolder archive: 3 classes, 8 train + 2 test 32x32 images each."""
    members, _ = image_folder(np.random.default_rng(0), per_class={"train": 8, "test": 2}, size=32)
    return str(write_archive(tmp_path_factory.mktemp("data") / "tiny-cifar.tgz", members))


def tiny_params(archive: str, root: Path) -> dict:
    """The smoke preset, smaller still (as tests/test_distill_image.py), as top-level flow parameters."""
    return {"preset": "smoke", "device": "cpu", "root": str(root), "dataset": {"archive": archive},
            "teacher": {"steps": 4, "preview_samples": 0}, "student": {"train": {"steps": 4}},
            "pairs": {"seeds": {"start": 0, "stop": 32}, "heldout_seeds": {"start": 32, "stop": 48},
                      "chunk_size": 16},
            "filter": {"neighbours": 4, "candidates": 8, "calibration_samples": 6, "grid_size": 4}}


def flow_runs(api: Api, **flt) -> list[dict]:
    return api.post("/flow_runs/filter", {"flow_runs": flt, "limit": 200})


def deployment(api: Api, name: str) -> dict:
    return api.get(f"/deployments/name/{name}")


def run_deployment_cli(env: dict, params: dict) -> str:
    """``prefect deployment run`` with the parameters as --params JSON; the new flow run's id."""
    out = ok(cli(env, "deployment", "run", DEPLOYMENT, "--params", json.dumps(params)))
    line = next((ln for ln in out.splitlines() if "UUID:" in ln), None)
    assert line, out
    return line.split("UUID:")[1].strip()


def wait_done(api: Api, flow_run_id: str, logs: dict, timeout: float = 900) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        fr = api.get(f"/flow_runs/{flow_run_id}")
        if fr["state"] and fr["state"]["type"] in TERMINAL:
            return fr
        if time.monotonic() > deadline:
            pytest.fail(f"flow run {flow_run_id} did not finish within {timeout:.0f} s (state {fr['state']}):\n"
                        + "\n".join(f"--- {p}\n{tail(f)}" for p, f in logs.items()))
        time.sleep(2)


def describe(fr: dict, logs: dict) -> str:
    return f"{fr['name']}: {fr['state']}\n" + "\n".join(f"--- {p}\n{tail(f)}" for p, f in logs.items())


@pytest.fixture(scope="module")
def first(pools, archive, tmp_path_factory) -> dict:
    api, env, logs = pools
    root = tmp_path_factory.mktemp("root")
    params = tiny_params(archive, root)
    parent = wait_done(api, run_deployment_cli(env, params), logs)
    return dict(api=api, env=env, logs=logs, root=root, params=params, parent=parent)


def test_deployments_and_pools_are_registered(pools):
    api, _, _ = pools
    cifar, gpu = deployment(api, DEPLOYMENT), deployment(api, "gpu-stage/gpu-stage")
    assert (cifar["work_pool_name"], gpu["work_pool_name"]) == ("kdm-cpu", "kdm-gpu")
    assert deployment(api, "kdm/distill-cifar10-cond")["parameters"] == {"recipe": "cifar10", "conditional": True}
    assert deployment(api, DEPLOYMENT)["parameters"] == {"recipe": "cifar10"}
    assert deployment(api, "kdm/distill-checkerboard")["parameters"] == {"recipe": "checkerboard"}
    limits = {name: api.get(f"/work_pools/{name}")["concurrency_limit"]
              for name in ("kdm-cpu", "kdm-gpu")}
    assert limits == {"kdm-cpu": None, "kdm-gpu": 1}


def test_parent_on_kdm_cpu_starts_one_gpu_stage_run_per_gpu_stage_on_kdm_gpu(first):
    from pipeline import stages
    api, parent, logs = first["api"], first["parent"], first["logs"]
    assert parent["state"]["type"] == "COMPLETED", describe(parent, logs)
    assert parent["work_pool_name"] == "kdm-cpu"
    assert parent["deployment_id"] == deployment(api, DEPLOYMENT)["id"]

    gpu = deployment(api, "gpu-stage/gpu-stage")
    children = flow_runs(api, deployment_id={"any_": [gpu["id"]]})
    assert sorted(c["name"].split("-")[0] for c in children) == sorted(GPU_STAGES), [c["name"] for c in children]
    for c in children:
        assert c["state"]["type"] == "COMPLETED", describe(c, logs)
        assert c["work_pool_name"] == "kdm-gpu", c["name"]
        task_run = api.get(f"/task_runs/{c['parent_task_run_id']}")
        assert task_run["flow_run_id"] == parent["id"], c["name"]
    assert {c["id"] for c in flow_runs(api, parent_flow_run_id={"any_": [parent["id"]]})} == \
        {c["id"] for c in children}
    # each child ran the stage its name says, and the stages ran one after another (pool limit 1, awaited)
    order = sorted(children, key=lambda c: c["start_time"])
    assert [c["name"].split("-")[0] for c in order] == list(GPU_STAGES)
    for a, b in zip(order, order[1:]):
        assert a["end_time"] <= b["start_time"], (a["name"], b["name"])

    # every stage is committed under root, at the versions the plan computes from the same config
    cfg = DistillImageConfig.model_validate(first["params"])
    plan = stages.plan(cfg)
    assert plan["complete"] and plan["todo"] == []
    root = Path(first["root"])
    for name in STAGES:
        st = plan["stages"][name]
        assert st["uri"] == str(root / KINDS[name] / st["version"]), name
        marker = "zarr.json" if name in ("dataset", "pairs", "filter") else "manifest.json"     # Zarr stores keep it in attrs
        assert (Path(st["uri"]) / marker).is_file(), name
    # each gpu-stage run is named after its stage and the version it committed
    assert sorted(c["name"] for c in children) == \
        sorted(f"{s}-{plan['stages'][s]['version']}" for s in GPU_STAGES)
    assert not list(root.rglob("*.partial"))


def test_parent_publishes_report_and_table_under_stable_keys(first):
    from pipeline import stages
    api, parent = first["api"], first["parent"]
    plan = stages.plan(DistillImageConfig.model_validate(first["params"]))
    key = f"cifar10-{plan['stages']['dataset']['version'][3:11]}-{plan['stages']['teacher']['version']}"
    arts = api.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [parent["id"]]}}})
    by_key = {a["key"]: a for a in arts if a["key"]}
    assert {f"{key}-report", f"{key}-metrics", f"{key}-teacher-student", f"{key}-student-samples",
            *(f"{key}-{n}-link" for n in STAGES)} <= set(by_key)
    assert by_key[f"{key}-report"]["type"] == "markdown" and by_key[f"{key}-metrics"]["type"] == "table"
    md = by_key[f"{key}-report"]["data"]
    assert "## Lineage" in md and "KDM distillation: CIFAR-10 (smoke)" in md
    for name in STAGES:
        assert plan["stages"][name]["version"] in md or name == "extractor", name
    table = by_key[f"{key}-metrics"]["data"]
    rows = json.loads(table) if isinstance(table, str) else table
    assert {r["subject"] for r in rows} >= {"teacher", "student", "student / teacher"}
    # the GPU stages' progress bars belong to their own runs on kdm-gpu
    gpu = deployment(api, "gpu-stage/gpu-stage")
    child_ids = [c["id"] for c in flow_runs(api, deployment_id={"any_": [gpu["id"]]})]
    progress = api.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": child_ids},
                                                            "type": {"any_": ["progress"]}}})
    assert len(progress) == 3 and all(p["data"] == 100.0 for p in progress)        # teacher, pairs, student


def test_second_run_with_the_same_parameters_dispatches_nothing(first):
    api, env, logs, root = first["api"], first["env"], first["logs"], Path(first["root"])
    gpu = deployment(api, "gpu-stage/gpu-stage")
    before = {c["id"] for c in flow_runs(api, deployment_id={"any_": [gpu["id"]]})}
    manifests = {p: p.stat().st_mtime_ns for p in root.rglob("manifest.json")}
    assert manifests
    again = wait_done(api, run_deployment_cli(env, first["params"]), logs)
    assert again["state"]["type"] == "COMPLETED", describe(again, logs)
    assert again["id"] != first["parent"]["id"] and again["work_pool_name"] == "kdm-cpu"
    assert {c["id"] for c in flow_runs(api, deployment_id={"any_": [gpu["id"]]})} == before
    assert flow_runs(api, parent_flow_run_id={"any_": [again["id"]]}) == []
    assert {p: p.stat().st_mtime_ns for p in root.rglob("manifest.json")} == manifests   # nothing rewritten


def test_bad_parameters_are_refused_before_a_run_is_created(first):
    """The server checks parameters against the flow signature's schema: an unknown preset creates no run."""
    api, env = first["api"], first["env"]
    dep = deployment(api, DEPLOYMENT)
    assert dep["enforce_parameter_schema"] is True
    before = {r["id"] for r in flow_runs(api, deployment_id={"any_": [dep["id"]]})}
    res = cli(env, "deployment", "run", DEPLOYMENT, "--param", "preset=huge")
    assert res.returncode == 1, res.stdout
    assert "Validation failed for field 'preset'" in res.stdout and \
        "'huge' is not one of ['smoke', 'mini', 'full'," in res.stdout, res.stdout + res.stderr
    # the same request straight to the API: refused by the server itself
    r = api.request("POST", f"/deployments/{dep['id']}/create_flow_run", {"parameters": {"preset": "huge"}})
    assert r.status_code == 409 and "'huge' is not one of" in r.text, (r.status_code, r.text)
    r = api.request("POST", f"/deployments/{dep['id']}/create_flow_run", {"parameters": {"student": {"trian": {}}}})
    assert r.status_code == 409 and "trian" in r.text, (r.status_code, r.text)
    assert {r["id"] for r in flow_runs(api, deployment_id={"any_": [dep["id"]]})} == before
