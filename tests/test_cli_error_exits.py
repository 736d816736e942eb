"""Error exits happen before the heavy imports: a wrong input is reported without importing torch (and,
where no data is read, without Zarr), so the message comes in a fraction of a second (timed in
bench/cli_latency.py). Each case runs the CLI in a fresh interpreter and reports what it imported."""
import json
import os
import subprocess
import sys
from pathlib import Path

import shutil

import numpy as np
import pytest
import zarr

from pipeline import presets
from pipeline.pairs import importer
from pipeline.training import train2d as train
from pipeline.storage import manifests
from storage_schemas import MANIFEST_KEY

REPO = Path(__file__).resolve().parents[1]
PROBE = ("import json, sys\nfrom pipeline.cli.app import main\nrc = main(sys.argv[1:])\n"
         "print(json.dumps([rc, sorted(m for m in ('torch', 'zarr') if m in sys.modules)]))")


def run_cli(*argv) -> tuple[int, list[str], str]:
    p = subprocess.run([sys.executable, "-c", PROBE, *map(str, argv)], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    rc, heavy = json.loads(p.stdout.strip().splitlines()[-1])
    return rc, heavy, p.stderr.strip()


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    d = tmp_path_factory.mktemp("errors")
    np.save(d / "traj.npy", np.random.default_rng(0).standard_normal((3, 300, 2)).astype(np.float32))
    np.save(d / "n2.npy", np.zeros((20, 2), np.float32))
    importer.import_pairs(str(d / "traj.npy"), importer.PairsImportConfig(holdout_fraction=0.2, chunk_size=100),
                          str(d / "pairs"))
    g = zarr.open_group(str(d / "pairs"), mode="r")
    forged = d / "forged"
    forged.mkdir()
    meta = json.loads((d / "pairs" / "zarr.json").read_text())
    meta["attributes"][MANIFEST_KEY]["version"] = "pairs-0000000000000000"
    (forged / "zarr.json").write_text(json.dumps(meta))
    assert g.attrs[MANIFEST_KEY]["version"] != "pairs-0000000000000000"
    (d / "plain.txt").write_text("x")
    importer.import_pairs(str(d / "traj.npy"), importer.PairsImportConfig(holdout_fraction=0.0, chunk_size=100),
                          str(d / "noheld"))
    shutil.copytree(d / "pairs", d / "damaged")
    (d / "damaged" / "x_0" / "c" / "1" / "0").unlink()
    shutil.copytree(d / "pairs", d / "held_damaged")
    (d / "held_damaged" / "heldout" / "x_T" / "c" / "0" / "0").unlink()
    np.save(d / "traj3.npy", np.random.default_rng(1).standard_normal((3, 300, 3)).astype(np.float32))
    importer.import_pairs(str(d / "traj3.npy"), importer.PairsImportConfig(holdout_fraction=0.2, chunk_size=100),
                          str(d / "pairs3d"))
    train.train_student(str(d / "pairs"), presets.load("student", "smoke", None, ["train.steps=5", "train.threads=1"]),
                        str(d / "student"), progress=False)
    (d / "unfinished").mkdir()
    (d / "unfinished" / "config.json").write_text("{}")
    return d


CASES = [   # (argv, exit code, words of the message, modules it may import)
    (["pairs", "info", "{w}/nope"], 1, "no pair store at", ()),
    (["pairs", "info", "{w}/plain.txt"], 1, "no pair store at", ()),
    (["pairs", "info", "{w}/forged"], 1, "is not the hash of its recorded inputs", ()),
    (["pairs", "filter", "--pairs", "{w}/nope", "--out", "{w}/f"], 1, "no pair store at", ()),
    (["pairs", "filter", "--pairs", "{w}/forged", "--out", "{w}/f"], 1, "is not the hash", ()),
    (["pairs", "import", "{w}/n2.npy", "--format", "kdm-trajectories", "--holdout", "0.2", "--out", "{w}/i"], 1,
     "expects a (T, N, D) array", ()),
    (["pairs", "generate", "--teacher", "{w}/nope", "--seeds", "0-9", "--out", "{w}/g"], 1, "does not exist", ()),
    (["train", "--pairs", "{w}/nope", "--preset", "smoke", "--out", "{w}/t"], 1, "no pair store at", ()),
    (["train", "--pairs", "{w}/forged", "--preset", "smoke", "--out", "{w}/t"], 1, "is not the hash", ()),
    (["train", "--pairs", "{w}/pairs", "--preset", "nosuch", "--out", "{w}/t"], 1, "unknown student preset", ()),
    (["train", "--pairs", "{w}/pairs", "--preset", "smoke", "--out", "{w}/pairs"], 1,
     "holds another kind of artifact, a committed pair store", ()),
    (["train", "--pairs", "{w}/pairs", "--preset", "smoke", "--out", "{w}"], 1, "is not empty and is not a run", ()),
    (["train", "--pairs", "{w}/pairs", "--preset", "smoke", "--set", "train.seed=7", "--out", "{w}/student"], 1,
     "already holds version kdm-", ()),
    (["train-image", "--pairs", "{w}/nope", "--preset", "cifar10-uncond", "--out", "{w}/ti"], 1, "no pair store", ()),
    (["train-image", "--pairs", "{w}/pairs", "--preset", "cifar10-uncond", "--out", "{w}/pairs"], 1,
     "holds another kind of artifact", ()),
    (["evaluate", "--student", "{w}/nope", "--pairs", "{w}/pairs", "--out", "{w}/e"], 1, "holds no finished student", ()),
    (["sample", "--student", "{w}/nope", "--num", "3", "--out", "{w}/s.npy"], 1, "does not exist", ()),
    (["teacher", "train", "--preset", "nosuch", "--out", "{w}/te"], 1, "unknown teacher preset", ()),
    (["teacher", "train", "--preset", "smoke", "--out", "{w}/pairs"], 1, "holds a committed pair store", ()),
    (["teacher", "train", "--preset", "smoke", "--out", "{w}/unfinished"], 1,
     "exists but is not a committed kdm artifact; choose another output location (it is kept)", ()),
    (["pairs", "generate", "--teacher", "{w}/pairs", "--seeds", "0-9", "--out", "{w}/student"], 1,
     "holds a committed student artifact (kdm-student), not the artifact this command writes", ()),
    (["teacher", "bootstrap", "--dataset", "{w}/nope", "--out", "{w}/tb"], 1, "no dataset at", ()),
    (["dataset", "prepare", "{w}/nope.tar.gz", "--out", "{w}/d"], 1, "archive", ()),
    (["model", "info", "--preset", "nosuch"], 1, "unknown preset", ()),
    (["extractor", "info", "{w}/nope"], 1, "does not exist", ()),
    (["pairs", "info", "{w}/pairs", "--verify"], 0, "", ("zarr",)),      # reading data needs Zarr, not torch
    (["train", "--pairs", "{w}/damaged", "--preset", "smoke", "--out", "{w}/t2"], 1, "chunk 1", ("zarr",)),
    (["evaluate", "--student", "{w}/student", "--pairs", "{w}/pairs3d", "--out", "{w}/e1/r.json"], 1,
     "generates 2-D points", ("zarr",)),
    (["evaluate", "--student", "{w}/student", "--pairs", "{w}/noheld", "--out", "{w}/e2/r.json"], 1,
     "has no held-out split", ("zarr",)),
    (["evaluate", "--student", "{w}/student", "--pairs", "{w}/held_damaged", "--out", "{w}/e3/r.json"], 1,
     "heldout: array 'x_T', chunk 0", ("zarr",)),
    (["report", "--report", "{w}/nope/report.json"], 1, "does not exist", ("zarr",)),
    (["sample", "--student", "{w}/pairs", "--num", "3", "--seed", "0", "--out", "{w}/s.npy"], 1,
     "a Zarr store, not a student run", ()),
    (["sample", "--student", "{w}/unfinished", "--num", "3", "--seed", "0", "--out", "{w}/s.npy"], 1,
     "an unfinished student run", ()),
    (["sample", "--student", "{w}/student", "--num", "3", "--seed", "0", "--out", "{w}"], 1, "is a directory", ()),
]


@pytest.mark.parametrize("argv, code, words, allowed", CASES, ids=[" ".join(c[0][:2]) + f"-{i}" for i, c in enumerate(CASES)])
def test_error_exits_come_before_heavy_imports(w, argv, code, words, allowed):
    rc, heavy, err = run_cli(*[a.format(w=w) for a in argv])
    assert rc == code, err
    if words:
        assert words in err and "Traceback" not in err and len(err.splitlines()) <= 2, err
    assert set(heavy) <= set(allowed), f"imported {heavy} before the error: {err}"


def test_the_fast_manifest_read_matches_zarrs_view(w):
    m = manifests.check_pair_store(str(w / "pairs"))
    assert m.model_dump(mode="json") == zarr.open_group(str(w / "pairs"), mode="r").attrs[MANIFEST_KEY]
    assert manifests.MANIFEST_KEY == MANIFEST_KEY
