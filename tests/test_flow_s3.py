"""The `kdm` flow with its artifact root on S3 (a loopback moto server), and resuming a failed run.

Every stage reads and writes through the root URL; the student trains in a local temporary directory
mirrored to ``<url>.partial`` and resumes from the checkpoints stored there.
"""
import contextlib
import io
import json

import pytest

import moto.server  # noqa: E402,F401  (test dependencies: make test installs them)
import s3fs  # noqa: E402,F401

from pipeline.storage import artifacts
from pipeline import presets
from pipeline import stages
from pipeline.training import train2d as train
from pipeline.storage.pairstore import PairStore  # noqa: E402
from s3_server import committed_files, listing, moto_s3  # noqa: E402
from storage_schemas import EvaluationReport  # noqa: E402

BUCKET = "kdm-flow"
SECRET = "kdm-test-secret-7f3a9c"      # must never reach a log line or a UI artifact
STAGES = ("teacher", "pairs", "filter", "student", "evaluation")


@pytest.fixture(scope="module")
def s3():
    with moto_s3(BUCKET, secret=SECRET) as fs:
        yield fs


def smoke(root: str):
    return presets.load("distill", "smoke", sets=[f"root={root}"])


def _run_text(*states) -> str:
    """The log messages of the given flow runs and every artifact body the server holds (after the log queue
    is drained); log lines of other runs, e.g. of an earlier test on the same server, are not read."""
    from prefect_helpers import flow_run_log_text, read_prefect_artifacts
    logs = [flow_run_log_text(s.state_details.flow_run_id) for s in states]
    arts = [json.dumps(a.data) if not isinstance(a.data, str) else a.data for a in read_prefect_artifacts()]
    return "\n".join(logs + arts)


def _run(cfg):
    """(the flow's result, its final state) of one ``kdm`` run."""
    from flows.kdm import kdm
    state = kdm(config=cfg, return_state=True)
    return state.result(), state


def test_flow_on_s3_writes_every_artifact_skips_on_rerun_and_matches_a_local_run(harness, s3, tmp_path):
    root = f"s3://{BUCKET}/runs"
    first, first_state = _run(smoke(root))
    files, rel = committed_files(s3, BUCKET, root, first,
                                 dict(zip(STAGES, ("teachers", "pairs", "pairs", "students", "evaluations"))))
    assert first["student"]["resumed_from_step"] is None
    assert {rel("teacher", "manifest.json"), rel("teacher", "weights.safetensors"),
            rel("pairs", "zarr.json"), rel("pairs", "heldout/zarr.json"), rel("filter", "zarr.json"),
            rel("student", "manifest.json"), rel("student", "student.safetensors"), rel("student", "config.json"),
            rel("student", "metrics.jsonl"), rel("student", "checkpoints/step-00000040/state.json"),
            rel("student", "checkpoints/step-00000040/ema.safetensors"),
            rel("evaluation", "report.json"), rel("evaluation", "samples.png"),
            rel("evaluation", "noise_structure_student.png"),
            rel("evaluation", "noise_structure_teacher.png")} <= files
    student = train.read_student_manifest(first["student"]["uri"])
    assert student.steps_done == 40 and student.weights_sha256 == first["student"]["weights_sha256"]
    assert artifacts.sha256_file(artifacts.join(first["student"]["uri"], "student.safetensors")) \
        == student.weights_sha256
    metrics = [json.loads(ln) for ln in artifacts.read_bytes(artifacts.join(first["student"]["uri"],
                                                                             "metrics.jsonl")).decode().splitlines()]
    assert [r["step"] for r in metrics] == [10, 20, 30, 40]
    report = EvaluationReport.model_validate(artifacts.read_json(first["evaluation"]["report"]))
    assert report.student_version == first["student"]["version"] and report.protocol.num_samples == 400
    assert artifacts.read_bytes(artifacts.join(first["evaluation"]["uri"], "samples.png"))[:8] == b"\x89PNG\r\n\x1a\n"

    from pipeline.cli import main
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):       # not capsys: Prefect's console handler would keep its stream
        assert main(["report", "--root", root]) == 0            # `kdm report` finds the report on S3
    out = buf.getvalue()
    assert f"report {first['evaluation']['report']} (student {first['student']['version']}" in out
    assert "student (1 NFE)" in out

    before = listing(s3, BUCKET, "runs")
    second, second_state = _run(smoke(root))
    for stage in STAGES:
        assert second[stage]["skipped"] is True, stage
        assert second[stage]["version"] == first[stage]["version"], stage
    assert listing(s3, BUCKET, "runs") == before                      # a re-run writes nothing

    local, local_state = _run(smoke(str(tmp_path)))
    for stage in STAGES:
        assert local[stage]["version"] == first[stage]["version"], stage
        assert local[stage]["uri"] == first[stage]["uri"].replace(root, str(tmp_path)), stage
    for stage in ("pairs", "filter"):
        assert local[stage]["content_hash"] == first[stage]["content_hash"]
    assert PairStore.open(local["filter"]["uri"]).manifest.content_hash == \
        PairStore.open(first["filter"]["uri"]).manifest.content_hash
    assert local["student"]["weights_sha256"] == first["student"]["weights_sha256"]
    assert evaluate_rows(local) == evaluate_rows(first)

    from prefect_helpers import flow_run_log_text
    first_log, second_log = (flow_run_log_text(s.state_details.flow_run_id) for s in (first_state, second_state))
    assert "(exists, skipped)" not in first_log                             # the first run made every stage
    for stage in STAGES:                                                    # the re-run's own log says it skipped
        assert f"{stage} {second[stage]['version']} (exists, skipped)" in second_log, stage
    shipped = _run_text(first_state, second_state, local_state)
    assert "## Lineage" in shipped                                          # the artifacts arrived
    assert SECRET not in shipped


def evaluate_rows(res: dict) -> list[dict]:
    from pipeline.evaluation import evaluate2d as evaluate
    return evaluate.metrics_table(evaluate.read_report(res["evaluation"]["uri"]))


@pytest.mark.parametrize("where", ["s3", "local"])
def test_failed_student_run_rerun_skips_finished_stages_and_resumes_from_its_checkpoint(
        where, harness, s3, tmp_path, monkeypatch):
    from flows.kdm import kdm
    root = f"s3://{BUCKET}/resume" if where == "s3" else str(tmp_path / "resume")
    cfg = smoke(root)
    real = train._train_run

    def crash_at_step_30(run, out, **kw):
        real(run, out, **(kw | {"stop_after": 30}))
        raise RuntimeError("simulated crash of the student run at step 30")

    monkeypatch.setattr(train, "_train_run", crash_at_step_30)
    state = kdm(config=cfg, return_state=True)
    assert state.is_failed()
    with pytest.raises(RuntimeError, match="simulated crash"):
        state.result()
    monkeypatch.undo()

    student_uri = _student_uri(cfg)
    assert not artifacts.committed(student_uri)
    if where == "s3":
        partial = artifacts.partial_url(student_uri)
        assert artifacts.exists(artifacts.join(partial, "checkpoints", "step-00000020", "state.json"))
        assert not artifacts.exists(artifacts.join(partial, "checkpoints", "step-00000040"))

    again, again_state = _run(cfg)                                    # the same parameters: what "Retry" does
    for stage in ("teacher", "pairs", "filter"):
        assert again[stage]["skipped"] is True, stage
    assert again["student"]["skipped"] is False and again["student"]["resumed_from_step"] == 20
    shipped = _run_text(again_state)   # the log lines the README tells users to look for, of this run
    assert f"student {again['student']['version']} resumed from its step-20 checkpoint" in shipped
    for stage in ("teacher", "pairs", "filter"):
        assert f"{stage} {again[stage]['version']} (exists, skipped)" in shipped, stage
    assert again["student"]["uri"] == student_uri and again["student"]["steps"] == 40
    assert again["evaluation"]["skipped"] is False
    metrics = [json.loads(ln) for ln in artifacts.read_bytes(artifacts.join(student_uri, "metrics.jsonl"))
               .decode().splitlines()]
    assert [r["step"] for r in metrics] == [10, 20, 30, 40]      # the steps after the checkpoint, once

    from pipeline.recipes.checkerboard import Student2D
    reference = stages.run_stage(Student2D(), cfg.model_copy(update={"root": str(tmp_path / "uninterrupted")}),
                                 {"filter": again["filter"]["uri"]}, stages.StageContext(progress_bars=False))
    assert reference["version"] == again["student"]["version"]
    assert reference["weights_sha256"] == again["student"]["weights_sha256"]


def _student_uri(cfg) -> str:
    """The student run URL of ``cfg``, from the versions alone (nothing is read)."""
    from pipeline.pairs import filter as filt
    from pipeline.pairs import generate
    from pipeline.teachers import flow_matching as teacher
    pairs = generate.pairs_version(teacher.teacher_version(cfg.teacher), cfg.pairs)
    filtered = filt.filter_version(pairs, cfg.filter, None)
    return artifacts.join(cfg.root, "students", train.run_version(filtered, cfg.student))
