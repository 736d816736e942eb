"""bench/cifar10_mini.py: the product's cifar10 recipe stages (pipeline.stages.run_stage) chained on CIFAR-10 at
toy sizes, on the CPU."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared_data import require, shared_data

REPO = Path(__file__).resolve().parents[1]
CIFAR = shared_data("cifar10-jpeg.tar.gz")

TOY = ["--device", "cpu", "--extractor-epochs", "1", "--extractor-width", "8", "--extractor-images", "2000",
       "--reference-images", "2000", "--teacher-set", "steps=10", "--teacher-set", "batch_size=16",
       "--teacher-set", "preview_samples=4", "--teacher-set", "checkpoint_every=10", "--train-pairs", "64",
       "--heldout-pairs", "32", "--teacher-steps", "3", "--student-steps", "8", "--student-batch", "16",
       "--student-channels", "8", "--student-layout", "nchw", "--kid-subsets", "5", "-q"]


@pytest.mark.slow
def test_mini_benchmark_runs_the_recipe_stages_and_finds_its_artifacts(tmp_path, monkeypatch):
    require(CIFAR)
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import cifar10_mini
    out = tmp_path / "out"
    args = ["--archive", str(CIFAR), "--out", str(out), *TOY]
    assert cifar10_mini.main(args) == 0
    res = json.loads((out / "results.json").read_text())
    st = res["stages"]
    assert list(st) == ["dataset", "extractor", "teacher", "pairs", "filter", "student", "evaluation"]
    assert [s["status"] for s in st.values()] == ["ok"] * 7
    assert st["dataset"]["train"] == 50_000 and st["dataset"]["test"] == 10_000
    assert st["pairs"]["train"] == 64 and st["pairs"]["heldout"] == 32 and st["pairs"]["nfe"] == 5
    # the filter sits between pairs and student: every train pair is kept or counted under one reason,
    # the held-out seeds are copied unchanged, and the student trains on the filtered store
    fi = st["filter"]
    assert fi["source_version"] == st["pairs"]["version"] and fi["version"] != st["pairs"]["version"]
    assert set(fi["counts"]) == {"kept", "nonfinite", "duplicate_seed", "exact_duplicate", "memorised", "blocklist",
                                 "near_duplicate"}
    assert sum(fi["counts"].values()) == 64 and fi["train"] == fi["counts"]["kept"] > 0
    assert fi["heldout"] == 32 and fi["calibration_test_images"] == 64
    assert res["uris"]["student"].endswith(st["student"]["version"])
    assert res["config"]["student"]["train"]["steps"] == 8 and res["config"]["filter"]["device"] == "cpu"
    assert st["student"]["steps"] == 8 and st["student"]["channels_last"] is False
    assert st["student"]["previews"] == [f"student_step{s:06d}.png" for s in (2, 4, 6, 8)]
    # the loss curve comes from the run's metrics.jsonl (log_every 100 > 8 steps: the last step only)
    assert [r["step"] for r in st["student"]["loss_curve"]] == [8]
    assert st["student"]["loss_last"]["loss_total"] > 0
    assert st["evaluation"]["fd_ratio_student_over_teacher"] > 0
    for f in ("teacher_samples.png", "teacher_student.png", "student_samples.png", "local_structure.png",
              "filter_grid.png", "metrics.json", *st["student"]["previews"]):
        assert (out / f).stat().st_size > 0, f
    # the artifacts live where the product's stages put them: <root>/<kind>/<version>
    root = out / "artifacts"
    assert st["student"]["version"] in {p.name for p in (root / "students").iterdir()}
    manifest = json.loads((root / "students" / st["student"]["version"] / "manifest.json").read_text())
    assert manifest["pairs_version"] == fi["version"]          # the student trained on the filtered store
    assert {st["pairs"]["version"], fi["version"]} <= {p.name for p in (root / "pairs").iterdir()}
    subjects = {m["subject"] for m in json.loads((out / "metrics.json").read_text())["metrics"]}
    assert {"cifar10-test", "uniform-noise(seed=0)", "teacher", "student"} <= subjects

    # a second run finds every artifact instead of recomputing it
    assert cifar10_mini.main(args) == 0
    again = json.loads((out / "results.json").read_text())["stages"]
    assert [s["status"] for s in again.values()] == ["ok"] * 7
    assert all(s["skipped"] for s in again.values())
    assert again["student"]["version"] == st["student"]["version"]
    assert again["filter"]["counts"] == fi["counts"]
    assert again["student"]["loss_curve"] == st["student"]["loss_curve"]       # read back from the committed run
