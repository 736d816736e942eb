"""The `kdm` flow end to end on the smoke preset under a real (test-harness) Prefect server."""
import json


from pipeline import presets
from storage_schemas import DistillCheckerboardConfig, EvaluationReport
from prefect_helpers import read_prefect_artifacts




def test_flow_runs_every_stage_publishes_artifacts_and_skips_on_rerun(harness, tmp_path):
    from flows.kdm import kdm
    cfg = presets.load("distill", "smoke", sets=[f"root={tmp_path}"])
    first = kdm(config=cfg)
    for stage, kind in (("teacher", "teachers"), ("pairs", "pairs"), ("filter", "pairs"),
                        ("student", "students"), ("evaluation", "evaluations")):
        assert first[stage]["uri"].startswith(str(tmp_path / kind)), stage
        assert first[stage]["skipped"] is False
        assert "table" not in first[stage]
    report = EvaluationReport.model_validate(json.loads(open(first["evaluation"]["report"]).read()))
    assert 0.0 <= report.student.in_cell_fraction <= 1.0
    assert report.protocol.num_samples == 400

    keys = {a.key for a in read_prefect_artifacts() if a.key}
    assert {"checkerboard-smoke-report", "checkerboard-smoke-metrics", "checkerboard-smoke-student-link",
            "checkerboard-smoke-samples", "checkerboard-smoke-frontier"} <= keys
    table = next(a for a in read_prefect_artifacts() if a.key == "checkerboard-smoke-metrics")
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [r["model"] for r in rows] == ["student (1 NFE)", "teacher x_0", "teacher, euler 1 step (1 NFE)",
                                          "teacher, euler 2 steps (2 NFE)", "teacher, euler 4 steps (4 NFE)"]
    assert [r["nfe"] for r in rows] == [1, 4, 1, 2, 4]
    md = next(a for a in read_prefect_artifacts() if a.key == "checkerboard-smoke-report").data
    assert "## Lineage" in md and first["student"]["version"] in md and "data:image/png;base64," in md

    second = kdm(config=cfg)
    for stage in ("teacher", "pairs", "filter", "student", "evaluation"):
        assert second[stage]["skipped"] is True, stage
        assert second[stage]["version"] == first[stage]["version"]


def test_flow_default_parameters_are_the_checkerboard_preset():
    import inspect
    from flows.kdm import kdm
    from pipeline import recipes
    params = inspect.signature(kdm.fn).parameters
    assert all(p.default is None for p in params.values())
    assert recipes.build_config() == presets.load("distill", "checkerboard") == DistillCheckerboardConfig()
    assert recipes.build_config(recipe="checkerboard", preset="smoke") == presets.load("distill", "smoke")
