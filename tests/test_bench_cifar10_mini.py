"""bench/cifar10_mini.py: the product's image stages chained on CIFAR-10 at toy sizes, on the CPU."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared_data import shared_data

REPO = Path(__file__).resolve().parents[1]
CIFAR = shared_data("cifar10-jpeg.tar.gz")

TOY = ["--device", "cpu", "--extractor-epochs", "1", "--extractor-width", "8", "--extractor-images", "2000",
       "--reference-images", "2000", "--teacher-set", "steps=10", "--teacher-set", "batch_size=16",
       "--teacher-set", "preview_samples=4", "--teacher-set", "checkpoint_every=10", "--train-pairs", "64",
       "--heldout-pairs", "32", "--teacher-steps", "3", "--student-steps", "8", "--student-batch", "16",
       "--student-channels", "8", "--student-layout", "nchw", "--kid-subsets", "5", "-q"]


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR.exists(), reason=f"{CIFAR} not available")
def test_mini_benchmark_runs_the_stage_functions_and_finds_its_artifacts(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import cifar10_mini
    out = tmp_path / "out"
    args = ["--archive", str(CIFAR), "--out", str(out), *TOY]
    assert cifar10_mini.main(args) == 0
    res = json.loads((out / "results.json").read_text())
    st = res["stages"]
    assert [s["status"] for s in st.values()] == ["ok"] * 6
    assert st["dataset"]["train"] == 50_000 and st["dataset"]["test"] == 10_000
    assert st["pairs"]["train"] == 64 and st["pairs"]["heldout"] == 32 and st["pairs"]["nfe"] == 5
    assert st["student"]["steps"] == 8 and st["student"]["channels_last"] is False
    assert st["student"]["previews"] == [f"student_step{s:06d}.png" for s in (2, 4, 6, 8)]
    assert st["evaluation"]["fd_ratio_student_over_teacher"] > 0
    for f in ("teacher_samples.png", "teacher_student.png", "student_samples.png", "local_structure.png",
              "metrics.json", *st["student"]["previews"]):
        assert (out / f).stat().st_size > 0, f
    # the artifacts live where the product's stages put them: <root>/<kind>/<version>
    root = out / "artifacts"
    assert st["student"]["version"] in {p.name for p in (root / "students").iterdir()}
    assert st["pairs"]["version"] in {p.name for p in (root / "pairs").iterdir()}
    subjects = {m["subject"] for m in json.loads((out / "metrics.json").read_text())["metrics"]}
    assert {"cifar10-test", "uniform-noise(seed=0)", "teacher", "student"} <= subjects

    # a second run finds every artifact instead of recomputing it
    assert cifar10_mini.main(args) == 0
    again = json.loads((out / "results.json").read_text())["stages"]
    assert all(again[s]["skipped"] for s in ("dataset", "extractor", "teacher", "pairs", "student", "evaluation"))
    assert again["student"]["version"] == st["student"]["version"]
