"""The CIFAR-10 distillation (smoke preset, made tiny) with its artifact root on S3 (a loopback moto server).

Every stage reads and writes through the root URL; the teacher bootstrap and the student train in local
temporary directories mirrored to ``<url>.partial`` and resume from the checkpoints stored there.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import moto.server  # noqa: E402,F401  (test dependencies: make test installs them)
import s3fs  # noqa: E402,F401

from image_fixtures import image_folder, single_thread, write_archive  # noqa: E402
from pipeline.storage import artifacts
from pipeline.training import image_train
from pipeline import stages
from pipeline.evaluation.evaluate_image import GRID_STUDENT, GRID_TEACHER_STUDENT
from pipeline.recipes import cifar10
from pipeline.teachers import bootstrap as teacher_bootstrap
from s3_server import committed_files, listing, moto_s3  # noqa: E402
from storage_schemas.common import deep_merge  # noqa: E402
from storage_schemas.distill_image import DistillImageConfig  # noqa: E402

BUCKET = "kdm-image"
STAGES = ("dataset", "extractor", "teacher", "pairs", "filter", "student", "evaluation")
KINDS = ("datasets", "extractors", "teachers", "pairs", "pairs", "students", "evaluations")
# The smoke preset, smaller still; two checkpoints per teacher and student run.
TINY = {"teacher": {"steps": 4, "preview_samples": 4, "checkpoint_every": 2},
        "student": {"train": {"steps": 4, "checkpoint_every": 2}},
        "pairs": {"seeds": {"start": 0, "stop": 32}, "heldout_seeds": {"start": 32, "stop": 48}, "chunk_size": 16},
        "filter": {"neighbours": 4, "candidates": 8, "calibration_samples": 6, "grid_size": 4}}


@pytest.fixture(scope="module")
def s3():
    with moto_s3(BUCKET) as fs:
        yield fs


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> str:
    members, _ = image_folder(np.random.default_rng(0), per_class={"train": 8, "test": 2}, size=32)
    return str(write_archive(tmp_path_factory.mktemp("data") / "tiny-cifar.tgz", members))


def smoke(archive: str, root: str, **over) -> DistillImageConfig:
    base = {"preset": "smoke", "root": root, "dataset": {"archive": archive}, **TINY}
    return DistillImageConfig.model_validate(deep_merge(base, over))


def run(cfg: DistillImageConfig) -> dict:
    with single_thread():
        return stages.run_recipe(cfg, stages.StageContext(progress_bars=False, log=lambda m: None))


@pytest.fixture(scope="module")
def first(s3, archive) -> dict:
    return run(smoke(archive, f"s3://{BUCKET}/runs"))


def test_every_stage_commits_to_s3_reruns_skip_and_versions_equal_a_local_run(s3, archive, first, tmp_path):
    root = f"s3://{BUCKET}/runs"
    files, rel = committed_files(s3, BUCKET, root, first, dict(zip(STAGES, KINDS)))
    assert first["teacher"]["resumed_from_step"] is None and first["student"]["resumed_from_step"] is None
    assert {rel("dataset", "zarr.json"), rel("dataset", "train/images/zarr.json"),
            rel("extractor", "manifest.json"), rel("teacher", "manifest.json"), rel("teacher", "weights.safetensors"),
            rel("teacher", "config.json"), rel("teacher", "run.json"), rel("teacher", "metrics.jsonl"),
            rel("teacher", "preview.png"), rel("pairs", "zarr.json"), rel("pairs", "heldout/zarr.json"),
            rel("filter", "zarr.json"), rel("filter", "heldout/zarr.json"),
            rel("student", "manifest.json"), rel("student", "student.safetensors"), rel("student", "config.json"),
            rel("student", "metrics.jsonl"), rel("student", "checkpoints/step-00000004/state.json"),
            rel("evaluation", "manifest.json"), first["evaluation"]["report"].removeprefix(root + "/"),
            rel("evaluation", GRID_TEACHER_STUDENT), rel("evaluation", GRID_STUDENT)} <= files
    assert not any(p.startswith(rel("teacher", "checkpoints")) for p in files)   # a teacher keeps no checkpoints
    assert any(p.startswith("reference-stats/") and p.endswith("/manifest.json") for p in files)
    sm = image_train.read_image_student_manifest(first["student"]["uri"])
    assert sm.steps_done == 4 and sm.weights_sha256 == first["student"]["weights_sha256"]
    assert artifacts.sha256_file(artifacts.join(first["student"]["uri"], sm.weights_file)) == sm.weights_sha256
    metrics = artifacts.read_bytes(artifacts.join(first["student"]["uri"], "metrics.jsonl")).decode().splitlines()
    assert [json.loads(ln)["step"] for ln in metrics] == [4]          # log_every 5: the last step only
    assert artifacts.read_bytes(artifacts.join(first["evaluation"]["uri"], GRID_STUDENT))[:4] \
        == b"\x89PNG"

    before = listing(s3, BUCKET, "runs")
    second = run(smoke(archive, root))
    for stage in STAGES:
        assert second[stage]["skipped"] is True, stage
        assert second[stage]["version"] == first[stage]["version"], stage
    assert listing(s3, BUCKET, "runs") == before                      # a re-run writes nothing

    local = run(smoke(archive, str(tmp_path)))
    for stage in STAGES:
        assert local[stage]["version"] == first[stage]["version"], stage
        assert local[stage]["uri"] == first[stage]["uri"].replace(root, str(tmp_path)), stage
    assert local["pairs"]["content_hash"] == first["pairs"]["content_hash"]
    assert local["filter"]["content_hash"] == first["filter"]["content_hash"]
    assert local["teacher"]["sha256"] == first["teacher"]["sha256"]
    assert local["student"]["weights_sha256"] == first["student"]["weights_sha256"]
    assert local["evaluation"]["mse"] == first["evaluation"]["mse"]
    assert local["evaluation"]["fd_student"] == first["evaluation"]["fd_student"]


def test_interrupted_student_resumes_from_its_checkpoint_at_the_s3_url(s3, archive, first, tmp_path, monkeypatch):
    cfg = smoke(archive, f"s3://{BUCKET}/runs", student={"train": {"steps": 6}})   # a new student, same pairs
    real = image_train.train_image_student

    def crash_after_first_checkpoint(*a, **kw):
        def on_checkpoint(step, ema):
            raise RuntimeError(f"simulated crash after the step-{step} checkpoint")
        return real(*a, **(kw | {"on_checkpoint": on_checkpoint}))

    monkeypatch.setattr(image_train, "train_image_student", crash_after_first_checkpoint)
    with pytest.raises(RuntimeError, match="simulated crash after the step-2 checkpoint"):
        run(cfg)
    monkeypatch.undo()
    out = artifacts.join(cfg.root, "students", image_train.image_run_version(first["filter"]["version"],
                                                                             cfg.student.model, cfg.student.train))
    partial = artifacts.partial_url(out)
    assert not artifacts.committed(out)
    assert artifacts.exists(artifacts.join(partial, "checkpoints", "step-00000002", "state.json"))
    assert not artifacts.exists(artifacts.join(partial, "checkpoints", "step-00000004"))

    again = run(cfg)
    for stage in ("dataset", "extractor", "teacher", "pairs", "filter"):
        assert again[stage]["skipped"] is True, stage
    assert again["student"]["uri"] == out and again["student"]["skipped"] is False
    assert again["student"]["resumed_from_step"] == 2 and again["student"]["steps"] == 6
    assert again["evaluation"]["skipped"] is False
    assert not artifacts.exists(partial)
    assert artifacts.exists(artifacts.join(out, "checkpoints", "step-00000006", "state.json"))

    with single_thread():                                   # the same student, uninterrupted, locally
        reference = stages.run_stage(cifar10.ImageStudent(), cfg.model_copy(update={"root": str(tmp_path)}),
                                     {"filter": first["filter"]["uri"]}, stages.StageContext(progress_bars=False))
    assert reference["version"] == again["student"]["version"]
    assert reference["weights_sha256"] == again["student"]["weights_sha256"]


def test_interrupted_teacher_bootstrap_resumes_from_its_checkpoint_at_the_s3_url(s3, archive, first):
    cfg = smoke(archive, f"s3://{BUCKET}/runs").teacher_stage().bootstrap.model_copy(update={"device": "cpu"})
    out = f"s3://{BUCKET}/teacher-resume/{first['teacher']['version']}"
    with single_thread():
        assert teacher_bootstrap.train_edm_teacher(first["dataset"]["uri"], cfg, out, progress=False,
                                                   stop_after=3) is None
        partial = artifacts.partial_url(out)
        assert artifacts.exists(artifacts.join(partial, "checkpoints", "step-00000002", "state.json"))
        assert not artifacts.committed(out)
        resumed: list[int] = []
        m = teacher_bootstrap.train_edm_teacher(first["dataset"]["uri"], cfg, out, progress=False,
                                                on_resume=resumed.append)
    assert resumed == [2]
    assert m.id == first["teacher"]["version"] and m.weights_sha256 == first["teacher"]["sha256"]
    assert artifacts.committed(out) and not artifacts.exists(partial)
    assert not artifacts.exists(artifacts.join(out, "checkpoints"))
