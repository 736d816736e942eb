"""The stage skeleton over one artifact root, checkerboard recipe (what `kdm distill` and the flow run)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkerboard import sample_checkerboard
from pipeline import presets
from pipeline import stages
from pipeline.training import train2d as train
from pipeline.evaluation.evaluate2d import read_report
from pipeline.storage.pairstore import PairStore
from storage_schemas import EvaluationReport

STAGE_DIRS = {"teacher": "teachers", "pairs": "pairs", "filter": "pairs", "student": "students",
              "evaluation": "evaluations"}


def smoke_cfg(root, *sets):
    return presets.load("distill", "smoke", sets=[f"root={root}", *sets])


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    logs: list[str] = []
    first = stages.run_recipe(smoke_cfg(root), stages.StageContext(progress_bars=False, log=logs.append))
    second = stages.run_recipe(smoke_cfg(root), stages.StageContext(progress_bars=False, log=lambda s: None))
    return root, first, second, logs


def test_every_stage_writes_under_its_root_dir(distilled):
    root, first, _, logs = distilled
    assert set(first) == set(STAGE_DIRS)
    for stage, sub in STAGE_DIRS.items():
        uri = Path(first[stage]["uri"])
        assert uri.parent == root / sub, stage
        assert uri.name == first[stage]["version"], stage
        assert uri.is_dir(), stage
        assert first[stage]["skipped"] is False, stage
    assert len(logs) == 5 and logs[0].startswith("teacher") and logs[-1].startswith("evaluation")
    # nothing half-written is left behind
    assert not list(root.rglob("*.partial"))


def test_second_run_skips_every_stage_with_the_same_versions(distilled):
    _, first, second, _ = distilled
    for stage in STAGE_DIRS:
        assert second[stage]["skipped"] is True, stage
        assert second[stage]["version"] == first[stage]["version"], stage
        assert second[stage]["uri"] == first[stage]["uri"], stage
    assert second["student"]["weights_sha256"] == first["student"]["weights_sha256"]
    assert second["evaluation"]["table"] == first["evaluation"]["table"]


def test_stage_summaries_link_the_artifacts(distilled):
    root, r, _, _ = distilled
    t, p, f, s = r["teacher"], r["pairs"], r["filter"], r["student"]
    assert t["version"].startswith("fm-") and len(t["sha256"]) == 64
    assert (p["count"], p["heldout_count"]) == (2000, 400)
    # the smoke preset filters nothing out of 2,000 fresh pairs; each reason is counted, in order
    assert f["counts"] == {"nonfinite": 0, "duplicate_seed": 0, "blocklist": 0, "near_duplicate": 0, "kept": 2000}
    assert list(f["counts"])[-1] == "kept" and f["count"] == 2000
    assert f["heldout_count"] == 400
    fs = PairStore.open(f["uri"])
    assert fs.manifest.filter.source_version == p["version"]
    assert fs.manifest.teacher.id == t["version"]
    m = train.read_student_manifest(s["uri"])
    assert m.pairs_version == f["version"] and m.teacher_id == t["version"] and s["steps"] == 40
    assert s["trainable_parameters"] == m.trainable_parameters


def test_report_validates(distilled):
    root, r, _, _ = distilled
    ev = r["evaluation"]
    path = Path(ev["report"])
    assert path == Path(ev["uri"]) / "report.json"
    rep = EvaluationReport.model_validate(json.loads(path.read_text()))
    assert rep == read_report(ev["uri"])
    assert rep.student_version == r["student"]["version"]
    assert rep.pairs_version == r["filter"]["version"]
    assert rep.teacher_id == r["teacher"]["version"]
    assert rep.student.num_points == rep.teacher_reference.num_points == 400
    for ms in (rep.student, rep.teacher_reference):
        assert 0 <= ms.in_cell_fraction <= 1 and 0 <= ms.outlier_rate <= 1 and ms.swd >= 0
    assert set(rep.plots) == {"samples", "noise_structure_student", "noise_structure_teacher", "frontier"}
    for f in rep.plots.values():
        assert (path.parent / f).is_file()
    # the smoke preset cuts the teacher's Euler solver (4 steps) short to 1, 2 and 4 NFE: the frontier
    assert [row["model"] for row in ev["table"]] == ["student (1 NFE)", "teacher x_0", "teacher, euler 1 step (1 NFE)",
                                                     "teacher, euler 2 steps (2 NFE)", "teacher, euler 4 steps (4 NFE)"]
    assert [p.nfe for p in rep.frontier] == [1, 1, 2, 4] and rep.frontier[-1].metrics.pair_mse < 1e-10
    assert ev["table"][0]["in_cell"] == round(rep.student.in_cell_fraction, 4)


def test_a_changed_stage_config_reuses_the_upstream_artifacts(distilled):
    root, first, _, _ = distilled
    res = stages.run_recipe(smoke_cfg(root, "student.train.steps=20", "evaluation.plots=false"), stages.StageContext(progress_bars=False, log=lambda s: None))
    for stage in ("teacher", "pairs", "filter"):
        assert res[stage]["skipped"] is True and res[stage]["version"] == first[stage]["version"]
    for stage in ("student", "evaluation"):
        assert res[stage]["skipped"] is False and res[stage]["version"] != first[stage]["version"]
    assert res["student"]["steps"] == 20
    assert len(list((root / "students").iterdir())) == 2


def test_import_source(tmp_path):
    g = torch.Generator().manual_seed(0)
    x0 = sample_checkerboard(600, generator=g).numpy()
    xT = torch.randn(600, 2, generator=g).numpy()
    src = tmp_path / "traj.npy"
    np.save(src, np.stack([xT, 0.5 * (xT + x0), x0]).astype(np.float32))
    root = tmp_path / "art"
    res = stages.run_recipe(smoke_cfg(root, "source=import", f"import_uri={src}", "evaluation.plots=false",
                                       "import_config.holdout_fraction=0.1"), stages.StageContext(progress_bars=False, log=lambda s: None))
    assert "teacher" not in res
    assert res["pairs"]["version"].startswith("import-")
    assert (res["pairs"]["count"], res["pairs"]["heldout_count"]) == (540, 60)
    assert Path(res["pairs"]["uri"]).parent == root / "pairs"
    rep = read_report(res["evaluation"]["uri"])
    assert rep.teacher_id is None and rep.student.num_points == 60
    assert rep.teacher_reference.in_cell_fraction == 1.0    # the imported x_0 are exact board samples
