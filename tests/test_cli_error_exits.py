"""Error exits happen before the heavy imports: a wrong input is reported without importing torch (and,
where no data is read, without Zarr), so the message comes in a fraction of a second (timed in
bench/cli_latency.py). Each case runs the CLI in a fresh interpreter and reports what it imported."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.pairs import importer
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
     "is not empty and is not a run", ()),
    (["train-image", "--pairs", "{w}/nope", "--preset", "cifar10-uncond", "--out", "{w}/ti"], 1, "no pair store", ()),
    (["train-image", "--pairs", "{w}/pairs", "--preset", "cifar10-uncond", "--out", "{w}/pairs"], 1,
     "is not empty and is not a run", ()),
    (["evaluate", "--student", "{w}/nope", "--pairs", "{w}/pairs", "--out", "{w}/e"], 1, "holds no finished student", ()),
    (["sample", "--student", "{w}/nope", "--num", "3", "--out", "{w}/s.npy"], 1, "does not exist", ()),
    (["teacher", "train", "--preset", "nosuch", "--out", "{w}/te"], 1, "unknown teacher preset", ()),
    (["teacher", "bootstrap", "--dataset", "{w}/nope", "--out", "{w}/tb"], 1, "no dataset at", ()),
    (["dataset", "prepare", "{w}/nope.tar.gz", "--out", "{w}/d"], 1, "archive", ()),
    (["model", "info", "--preset", "nosuch"], 1, "unknown preset", ()),
    (["extractor", "info", "{w}/nope"], 1, "does not exist", ()),
    (["pairs", "info", "{w}/pairs", "--verify"], 0, "", ("zarr",)),      # reading data needs Zarr, not torch
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
