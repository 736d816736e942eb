"""The users' path on a fresh clone (README, "CIFAR-10 distillation", the first run): the README's block
``make demo``, ``source scripts/env.sh``, ``prefect deployment run kdm/distill-cifar10 --param preset=smoke
--watch``, run verbatim in a fresh copy of the repository's tracked files in a temporary directory, with
KDM_DATA_DIR holding the CIFAR-10 archive (nothing is downloaded). The run completes on the demo's own server
and workers, with its filter stage, and its report names the dataset's source.

To stay cheap it runs ``make demo`` with KDM_DEMO_RUN=0 (everything but the checkerboard run, which
tests/test_ui.py and the flow tests cover) and gives the copy a ``.venv`` that is this interpreter's
environment (so ``make`` installs nothing); PYTHONPATH points at the copy, as its own editable install would.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

from s3_server import free_port
from shared_data import REPO, require, shared_data

MARK = "<!-- tests/test_user_path.py runs this block verbatim on a fresh copy of the repository -->"


def readme_block() -> str:
    text = (REPO / "README.md").read_text()
    assert MARK in text, "the README's CIFAR-10 section lost its first-run block"
    m = re.match(r"\s*```bash\n(.*?)```", text.split(MARK, 1)[1], re.S)
    assert m, "the first-run block is not a ```bash block right after its marker"
    return m.group(1)


def fresh_copy(dst: Path) -> Path:
    """The repository's tracked files (as a clone has them), nothing built or generated."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        src = REPO / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
    venv = Path(sys.prefix)
    (dst / ".venv").mkdir()
    (dst / ".venv" / "bin").symlink_to(venv / "bin")
    if (venv / "pyvenv.cfg").exists():
        (dst / ".venv" / "pyvenv.cfg").symlink_to(venv / "pyvenv.cfg")
    installed = dst / ".venv" / ".installed"          # make's stamp: newer than pyproject.toml, nothing to install
    installed.touch()
    later = time.time() + 60
    os.utime(installed, (later, later))
    return dst


def test_the_readme_first_run_on_a_fresh_clone(tmp_path):
    require(shared_data("cifar10-jpeg.tar.gz"))
    block = readme_block()
    assert block.splitlines() == ["make demo", "source scripts/env.sh",
                                  "prefect deployment run kdm/distill-cifar10 --param preset=smoke --watch"]
    clone = fresh_copy(tmp_path / "kdm")
    assert not (clone / "artifacts").exists() and not (clone / ".kdm").exists()
    data = tmp_path / "my-data"                         # the user's own copy of the archive
    data.mkdir()
    shutil.copy(shared_data("cifar10-jpeg.tar.gz"), data / "cifar10-jpeg.tar.gz")
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PREFECT_") and k not in ("KDM_ALLOWED_ROOTS", "KDM_DATA_MIRROR", "VIRTUAL_ENV")}
    env.update(KDM_DATA_DIR=str(data), KDM_OFFLINE="1", KDM_PORT=str(port), KDM_DEMO_RUN="0",
               PREFECT_WORKER_QUERY_SECONDS="2",     # the workers pick up the GPU-stage runs sooner (speed only)
               PYTHONPATH=str(clone), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    try:
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=clone, env=env, capture_output=True,
                           text=True, timeout=1200)
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-6000:] + _logs(clone)
        assert "finished successfully" in out, out[-3000:]
        run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
        api = f"http://127.0.0.1:{port}/api"
        logs = [e["message"] for e in httpx.post(f"{api}/logs/filter", timeout=30, json={
            "logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200}).json()]
        text = "\n".join(logs)
        assert f"dataset cifar10: {data / 'cifar10-jpeg.tar.gz'} (found; CIFAR-10, JPEG re-encoded public mirror" in text
        for stage in ("dataset", "extractor", "teacher", "pairs", "filter", "student", "evaluation"):
            assert re.search(rf"^{stage}[ :]", text, re.M), (stage, text[-3000:])
        arts = httpx.post(f"{api}/artifacts/filter", timeout=30,
                          json={"artifacts": {"flow_run_id": {"any_": [run_id]}}}).json()
        report = next(a["data"] for a in arts if (a["key"] or "").endswith("-report"))
        assert "### Privacy filter and dedup" in report                      # the filter stage ran and reported
        assert "Dataset: CIFAR-10, JPEG re-encoded public mirror" in report and "pixels differ" in report
        ev = [json.loads(p.read_text()) for p in (clone / "artifacts" / "evaluations").glob("*/manifest.json")]
        assert len(ev) == 1 and ev[0]["notes"]["dataset_source"].startswith("CIFAR-10, JPEG re-encoded public mirror")
    finally:
        subprocess.run(["bash", "scripts/stop.sh"], cwd=clone, env=env, capture_output=True, timeout=120)


def _logs(clone: Path) -> str:
    parts = []
    for name in ("worker.log", "gpu-worker.log", "server.log", "deploy.log"):
        p = clone / ".kdm" / name
        if p.exists():
            parts.append(f"\n--- {name}\n" + p.read_text(errors="replace")[-3000:])
    return "".join(parts)
