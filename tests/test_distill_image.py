"""The cifar10 recipe: presets and overrides, plan, every stage on CPU, the kdm flow, kdm distill / evaluate."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from image_fixtures import image_folder, single_thread, write_archive
from pipeline.storage import artifacts
from pipeline import recipes, stages
from pipeline.recipes import cifar10
from pipeline.cli import main
from pipeline.errors import KDMError
from pipeline.teachers.bootstrap import load_edm_teacher_config
from storage_schemas import format_validation_error
from storage_schemas.common import deep_merge
from storage_schemas.distill_image import (DistillImageConfig, ImageStudentStageConfig, 
                                           distill_image_preset)
from storage_schemas.kdm_image import image_preset
from storage_schemas.protocol import ImageMetricReport
from prefect_helpers import read_prefect_artifacts

pytestmark = pytest.mark.usefixtures("one_thread")

# The smoke preset, smaller still (seconds on one core).
TINY = {"teacher": {"steps": 4, "preview_samples": 0}, "student": {"train": {"steps": 4}},
        "pairs": {"seeds": {"start": 0, "stop": 32}, "heldout_seeds": {"start": 32, "stop": 48}, "chunk_size": 16},
        "filter": {"neighbours": 4, "candidates": 8, "calibration_samples": 6, "grid_size": 4}}
STAGES = ("dataset", "extractor", "teacher", "pairs", "filter", "student", "evaluation")
QUIET = stages.StageContext(progress_bars=False, log=lambda m: None)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> str:
    """A synthetic CIFAR-like ImageFolder archive: 3 classes, 8 train + 2 test 32x32 images each."""
    members, _ = image_folder(np.random.default_rng(0), per_class={"train": 8, "test": 2}, size=32)
    return str(write_archive(tmp_path_factory.mktemp("data") / "tiny-cifar.tgz", members))


def smoke(archive: str, root, **over) -> DistillImageConfig:
    base = {"preset": "smoke", "root": str(root), "dataset": {"archive": archive}, **TINY}
    return DistillImageConfig.model_validate(deep_merge(base, over))


@pytest.fixture(scope="module")
def done(archive, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("root")
    cfg = smoke(archive, root)
    with single_thread():
        plan0 = stages.plan(cfg)
        first = stages.run_recipe(cfg, QUIET)
        second = stages.run_recipe(cfg, QUIET)
    return dict(cfg=cfg, root=root, plan0=plan0, first=first, second=second)


# ----------------------------------------------------------------------------- config


def test_presets_are_the_documented_recipes():
    full = distill_image_preset("full")
    assert full == DistillImageConfig() and full.preset == "full" and full.device == "cuda"
    assert (len(full.pairs.seeds), len(full.pairs.heldout_seeds), full.pairs.sampler.nfe) == (1_000_000, 50_000, 35)
    assert full.student.train.steps == 800_000 and full.student.train.batch_size == 128
    # the engine's fast path: bf16, NCHW (faster than channels_last with the CUDA graph: BENCHMARKS.md calls
    # 4-6), the whole-step CUDA graph by default on one GPU; the conditional variant trains the same way
    assert (full.student.train.precision, full.student.train.channels_last, full.student.train.cuda_graphs,
            full.student.train.compile) == ("bf16", False, None, False)
    assert distill_image_preset("full", True).student.train == full.student.train
    assert distill_image_preset("mini", True).student.train == distill_image_preset("mini").student.train
    # every preset but smoke trains with lpips-own (BENCHMARKS.md "Student objective"); otherwise the paper's model
    assert full.student.model == image_preset("cifar10-uncond").model_copy(update={"distance": "lpips-own",
                                                                                   "adv_weight": 0.0})
    assert full.teacher == load_edm_teacher_config("cifar10-edm")
    mini = distill_image_preset("mini")
    assert mini.teacher == load_edm_teacher_config("cifar10-mini") and mini.teacher.steps == 1500
    assert (len(mini.pairs.seeds), len(mini.pairs.heldout_seeds), mini.student.train.steps) == (20_000, 5_000, 3000)
    assert mini.student.model.unet.model_channels == 64 and mini.student.model.distance == "lpips-own"
    assert mini.student.model.adv_weight == 0.0          # D off: it did not pay at this budget (BENCHMARKS.md)
    assert (mini.student.train.batch_size, mini.student.train.precision, mini.student.train.channels_last,
            mini.student.train.ema_decay) == (256, "bf16", False, 0.996667)   # the engine's fast path, EMA 1 - 10/steps
    for name, distance in (("smoke", "pseudo-huber"), ("mini", "lpips-own"), ("full", "lpips-own")):
        for cond in (False, True):
            cfg = distill_image_preset(name, conditional=cond)
            assert cfg.student.model.distance == distance
            names = [s.name for s in recipes.stages_of(cfg)]
            # the perceptual network is a stage of every run that trains with lpips-own, before the student
            assert ("perceptual" in names) == (distance == "lpips-own"), names
            if distance == "lpips-own":
                assert names.index("extractor") < names.index("perceptual") < names.index("student")
    sm = distill_image_preset("smoke")
    assert sm.device == "cpu" and sm.extractor.device == "cpu" and sm.pairs.sampler.steps == 18
    for name in ("smoke", "mini", "full"):
        cond = distill_image_preset(name, conditional=True)
        assert cond.conditional and cond.teacher.use_labels and cond.student.model.label_dim == 10
    assert distill_image_preset("full", True).student.model == image_preset("cifar10-cond").model_copy(
        update={"distance": "lpips-own", "adv_weight": 0.0})


def test_preset_override_semantics():
    cfg = DistillImageConfig.model_validate({"preset": "mini", "student": {"train": {"steps": 100}}})
    mini = distill_image_preset("mini")
    assert cfg.student.train.steps == 100
    assert cfg.student.train.model_copy(update={"steps": 3000}) == mini.student.train     # the rest stays mini's
    assert cfg.student.model == mini.student.model and cfg.teacher == mini.teacher
    assert DistillImageConfig.model_validate({"preset": "smoke", "conditional": True}) == distill_image_preset("smoke", True)
    # flow parameters: the cond deployment's {"conditional": true} + a caller's config mapping
    c = recipes.build_config({"preset": "mini", "teacher_uri": "t"}, recipe="cifar10", conditional=True)
    assert c.conditional and c.teacher_uri == "t" and c.student.model.label_dim == 10 and c.preset == "mini"
    # a top-level section given as a model contributes only the keys set in it
    c = recipes.build_config(None, recipe="cifar10", preset="smoke",
                             student=ImageStudentStageConfig.model_validate({"train": {"steps": 5}}))
    assert c.student.train.steps == 5 and c.student.model == distill_image_preset("smoke").student.model
    with pytest.raises(KDMError, match="contradicts the given config's preset='smoke'"):
        recipes.build_config(distill_image_preset("smoke"), preset="mini")


def test_validation_errors_name_the_field_and_the_fix():
    def msg(data) -> str:
        with pytest.raises(ValidationError) as e:
            DistillImageConfig.model_validate(data)
        return format_validation_error(e.value, "params")
    assert "preset: Input should be 'smoke', 'mini' or 'full' (got 'huge')" in msg({"preset": "huge"})
    assert "student.trian: unknown field (check the spelling)" in msg({"preset": "smoke", "student": {"trian": {}}})
    assert "heldout_seeds 10-19 overlap seeds 0-63" in msg({"preset": "smoke", "pairs": {"heldout_seeds":
                                                                                        {"start": 10, "stop": 20}}})
    assert "teacher.use_labels=True but conditional=False: set conditional instead" in \
        msg({"preset": "smoke", "teacher": {"use_labels": True}})
    assert "pairs.sampler: sigma_min, rho and precision are settings of kind 'edm-heun' only" in \
        msg({"preset": "smoke", "pairs": {"sampler": {"kind": "flow-matching-ode"}}})


def test_flow_parameters_validate_against_the_signature_schema():
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import ValidationError as SchemaError, validate
    from flows.kdm import kdm
    schema = parameter_schema(kdm.fn).model_dump_for_openapi()
    for ok in ({"recipe": "cifar10", "preset": "smoke"}, {"preset": "mini", "student": {"train": {"steps": 100}}},
               {"config": {"preset": "mini", "teacher_uri": "s3://b/teachers/edm-1"}}, {"conditional": True},
               {"recipe": "checkerboard", "preset": "checkerboard-import"}):
        validate(ok, schema, raise_on_error=True)
    for bad, why in (({"preset": "huge"}, "'huge' is not one of"), ({"recipe": "cifar11"}, "'cifar11' is not one of"),
                     ({"student": {"trian": {}}}, "trian"), ({"config": {"pairs": {"chunk_size": 0}}}, "chunk_size")):
        with pytest.raises(SchemaError, match=why):
            validate(bad, schema, raise_on_error=True)


# ----------------------------------------------------------------------------- plan and stages


def test_plan_lists_every_stage_before_and_after_the_run(done):
    p0, first = done["plan0"], done["first"]
    assert list(p0["stages"]) == list(STAGES) and p0["todo"] == list(STAGES) and not p0["complete"]
    assert p0["stages"]["dataset"]["uri"] == first["dataset"]["uri"]          # known from the archive alone
    assert p0["stages"]["extractor"] == {"uri": None, "version": None, "exists": False, "pool": "kdm-cpu",
                                         "after": "dataset"}
    assert p0["stages"]["student"]["pool"] == "kdm-gpu" and p0["stages"]["student"]["after"] == "filter"
    p1 = stages.plan(done["cfg"])
    assert p1["complete"] and p1["todo"] == []
    for name in STAGES:
        assert (p1["stages"][name]["uri"], p1["stages"][name]["version"]) == (first[name]["uri"],
                                                                            first[name]["version"]), name


def test_plan_with_a_given_teacher_knows_whether_it_has_its_student(done, archive, tmp_path):
    teacher = done["first"]["teacher"]["uri"]
    here = stages.plan(smoke(archive, done["root"], teacher_uri=teacher))
    assert here["stages"]["teacher"]["given"] and here["stages"]["student"]["exists"]
    fresh = stages.plan(smoke(archive, tmp_path / "other", teacher_uri=teacher))
    assert fresh["stages"]["student"]["version"] == done["first"]["student"]["version"]
    assert not fresh["stages"]["student"]["exists"] and fresh["stages"]["teacher"]["pool"] is None
    with pytest.raises(KDMError, match="is unconditional .label_dim 0. but the run has conditional=True"):
        stages.plan(smoke(archive, tmp_path, teacher_uri=teacher, conditional=True))
    # the stage verifies the given teacher's weights against its manifest
    ds = done["first"]["dataset"]["uri"]
    given = stages.run_stage(cifar10.EDMTeacher(), smoke(archive, tmp_path, teacher_uri=teacher), {"dataset": ds})
    assert (given["given"], given["version"], given["uri"]) == (True, done["first"]["teacher"]["version"], teacher)
    import shutil
    bad = tmp_path / "tampered"
    shutil.copytree(teacher, bad)
    w = bad / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    with pytest.raises(KDMError, match="does not match the manifest"):
        stages.run_stage(cifar10.EDMTeacher(), smoke(archive, tmp_path, teacher_uri=str(bad)), {"dataset": ds})


def test_student_stage_reports_its_steady_rate(monkeypatch):
    from types import SimpleNamespace
    from pipeline.training import image_train
    m = SimpleNamespace(steps_done=3000, train_seconds=456.7, steady_pairs_per_s=1843.4)
    monkeypatch.setattr(image_train, "read_image_student_manifest", lambda uri: m)
    assert cifar10.steady_rate_line("/r/students/s", 256) == (
        "student: 3000 steps x 256 in 456.7 s; steady state 1,843 pairs/s (7.20 steps/s; warm-up, checkpoint writes "
        "and hooks left out, as bench/bench_kdm_image.py times a step)")
    s = {"version": "v", "trainable_parameters": 1234, "steps": 3000, "train_seconds": 456.7}
    assert cifar10.ImageStudent().lineage(s) == "student `v` (1,234 parameters, 3000 steps, 457 s)"
    assert cifar10.ImageStudent().lineage({**s, "steady_pairs_per_s": 1843.4}) == \
        "student `v` (1,234 parameters, 3000 steps, 457 s, 1,843 pairs/s in steady state)"


def test_smoke_preset_end_to_end_and_skipped_on_rerun(done):
    first, second, root = done["first"], done["second"], Path(done["root"])
    kinds = dict(dataset="datasets", extractor="extractors", teacher="teachers", pairs="pairs", filter="pairs",
                 student="students", evaluation="evaluations")
    for name in STAGES:
        assert first[name]["uri"] == str(root / kinds[name] / first[name]["version"]), name
        assert first[name]["skipped"] is False and second[name]["skipped"] is True, name
        assert second[name]["version"] == first[name]["version"], name
    assert (first["dataset"]["train_images"], first["dataset"]["classes"]) == (24, 3)
    assert (first["pairs"]["count"], first["pairs"]["heldout_count"], first["pairs"]["nfe"]) == (32, 16, 35)
    assert first["student"]["steps"] == 4
    # 4 steps logged once (log_every 5): that one interval holds the warm-up, so there is no steady-state rate
    assert first["student"]["steady_pairs_per_s"] is None and second["student"]["steady_pairs_per_s"] is None
    assert cifar10.steady_rate_line(first["student"]["uri"], 16).startswith(
        "student: 4 steps in ") and "no steady-state rate" in cifar10.steady_rate_line(first["student"]["uri"], 16)
    ev = first["evaluation"]
    # which file the dataset came from is in its summary and in the evaluation's notes (every FD names it)
    source = first["dataset"]["source"]
    assert source.startswith("an archive that is not a known release (tiny-cifar.tgz) (sha256:") and \
        source.endswith("FD/FID on it is comparable only with numbers on this same archive")
    assert ev["notes"]["dataset_source"] == source
    fd = f"FD-{first['extractor']['id']}"
    assert ev["metric_names"]["fd"] == fd and ev["num_samples"] == 16 and ev["lpips"] is None
    assert ev["fd_ratio"] == pytest.approx(ev["fd_student"] / ev["fd_teacher"])
    report = ImageMetricReport.model_validate(json.loads(Path(ev["report"]).read_text()))
    assert {(m.name, m.subject) for m in report.metrics} >= {(fd, "teacher"), (fd, "student"), ("MSE", "student")}
    mse = report.get("MSE", "student")
    assert mse.protocol.seeds.text() == "32-47" and mse.protocol.pairs_version == first["pairs"]["version"] + "-heldout"
    # the filter passes the held-out split through unchanged (same version); the student trains on its output
    assert first["filter"]["counts"]["kept"] == 32 and first["filter"]["source_version"] == first["pairs"]["version"]
    assert report.get(fd, "teacher").protocol == report.get(fd, "student").protocol
    # the MSE is the student's one-step outputs against the teacher's x_0 on the held-out seeds
    from pipeline.storage.pairstore import PairStore
    from pipeline.evaluation.sample import load_image_student
    held = PairStore.open(first["pairs"]["uri"]).heldout().load(("x_T", "x_0"))
    model, _ = load_image_student(first["student"]["uri"])
    with torch.no_grad():
        x0 = model.generate(torch.from_numpy(held["x_T"])).numpy()
    assert mse.value == pytest.approx(float(np.mean((x0.astype(np.float64) - held["x_0"]) ** 2)), rel=1e-5)
    from PIL import Image
    for f in ev["plots"].values():
        with Image.open(Path(ev["uri"], f)) as im:
            assert im.format == "PNG" and im.width > 32


@pytest.mark.gpu
def test_gpu_stage_on_a_machine_without_gpu_is_a_clear_error(done, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    cfg, first = done["cfg"], done["first"]
    elsewhere = cfg.model_copy(update={"device": "cuda", "root": str(tmp_path)})
    with pytest.raises(KDMError, match="teacher stage: device 'cuda' was requested but no CUDA GPU is visible"):
        stages.run_stage(cifar10.EDMTeacher(), elsewhere, {"dataset": first["dataset"]["uri"]})
    with pytest.raises(KDMError, match="student stage: device 'cuda' was requested"):
        stages.run_stage(cifar10.ImageStudent(), elsewhere, {"filter": first["filter"]["uri"]})
    assert list(tmp_path.iterdir()) == []
    # finished stages need no GPU: they only read their outputs
    here = cfg.model_copy(update={"device": "cuda"})
    assert stages.run_stage(cifar10.ImageStudent(), here, {"filter": first["filter"]["uri"]})["skipped"]


# ----------------------------------------------------------------------------- command line


def test_kdm_evaluate_on_an_image_student(done, tmp_path, capsys):
    f = done["first"]
    args = ["evaluate", "--student", f["student"]["uri"], "--pairs", f["filter"]["uri"]]
    assert main(args + ["--out", str(tmp_path / "e")]) == 1
    assert "is an image student: its evaluation also needs --dataset and --extractor" in capsys.readouterr().err
    args += ["--dataset", f["dataset"]["uri"], "--extractor", f["extractor"]["uri"], "--root", str(tmp_path / "refs"),
             "--set", "kid_subsets=5"]
    assert main(args + ["--out", str(tmp_path / "eval")]) == 0
    out = capsys.readouterr().out
    from pipeline.evaluation.evaluate_image import read_evaluation_manifest
    m = read_evaluation_manifest(str(tmp_path / "eval"))
    assert m.config.kid_subsets == 5 and m.student_version == f["student"]["version"]
    assert m.summary["mse"] == pytest.approx(f["evaluation"]["mse"])        # same outputs, same seeds
    assert 0 < m.summary["mse_stderr"] < m.summary["mse"]                   # its standard error over the seeds
    assert f"FD-{f['extractor']['id']} teacher" in out and "ratio" in out and "| MSE | student |" in out
    assert f"MSE {m.summary['mse']:.4g} ± {m.summary['mse_stderr']:.2g} on" in out
    assert main(args + ["--out", str(tmp_path / "eval")]) == 0
    assert "(already there)" in capsys.readouterr().out


def test_kdm_distill_recipe_cifar10_dry_run_and_rerun(done, archive, capsys):
    sets = ["--set", f"dataset.archive={archive}", "--set", "teacher.steps=4", "--set", "teacher.preview_samples=0",
            "--set", "pairs.seeds.stop=32", "--set", "pairs.heldout_seeds={start: 32, stop: 48}",
            "--set", "pairs.chunk_size=16", "--set", "student.train.steps=4", "--root", str(done["root"])]
    sets += [a for k, v in TINY["filter"].items() for a in ("--set", f"filter.{k}={v}")]
    cifar = ["distill", "--recipe", "cifar10", "--preset", "smoke"]
    assert main([*cifar, "--dry-run", "-q", *sets]) == 0
    out = capsys.readouterr().out
    assert out.count(" done ") == 7 and "0 of 7 stages to do" in out
    assert main([*cifar, "-q", *sets]) == 0
    assert f"student {done['first']['student']['version']}" in capsys.readouterr().out
    assert main([*cifar, "--set", "student.trian.steps=1", "--dry-run"]) == 1
    assert "student.trian: unknown field" in capsys.readouterr().err
    assert main(["distill", "--recipe", "cifar10", "--preset", "checkerboard", "--dry-run"]) == 1
    assert "recipe cifar10 has no preset 'checkerboard'; valid: smoke, mini, full" in capsys.readouterr().err
    old = "distill" + "-image"                                          # the old command is gone
    with pytest.raises(SystemExit):
        main([old, "--preset", "smoke"])
    assert f"invalid choice: '{old}'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the Prefect flow




def test_flow_runs_the_stages_in_process_and_publishes_artifacts(harness, done, archive):
    from flows.kdm import kdm
    base = {"preset": "smoke", "root": str(done["root"]), "dataset": {"archive": archive}, **TINY}
    cfg = deep_merge(base, {"student": {"train": {"steps": 3}}})   # a new student on the existing pairs
    res = kdm(recipe="cifar10", config=cfg)
    for name in ("dataset", "extractor", "teacher", "pairs", "filter"):
        assert res[name]["skipped"] is True and res[name]["version"] == done["first"][name]["version"], name
    for name in ("student", "evaluation"):
        assert res[name]["skipped"] is False and res[name]["version"] != done["first"][name]["version"], name
    assert res["student"]["steps"] == 3
    key = recipes.build_report(recipes.build_config(cfg, recipe="cifar10"), res).key
    assert key == f"cifar10-{res['dataset']['version'][3:11]}-{res['teacher']['version']}"
    arts = read_prefect_artifacts()
    keys = {a.key for a in arts if a.key}
    assert {f"{key}-report", f"{key}-metrics", f"{key}-teacher-student", f"{key}-student-samples",
            f"{key}-student-link", f"{key}-teacher-link"} <= keys
    assert any(a.type == "progress" for a in arts)
    md = next(a for a in arts if a.key == f"{key}-report").data
    assert "## Lineage" in md and res["student"]["version"] in md and res["teacher"]["version"] in md
    assert "data:image/png;base64," in md and f"FD-{res['extractor']['id']}" in md and "not FID" in md
    assert f"Dataset: {res['dataset']['source']}." in md and "source: an archive that is not a known release" in md
    table = next(a for a in arts if a.key == f"{key}-metrics")
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert {r["subject"] for r in rows} >= {"teacher", "student", "student / teacher"}
    # the same run through the top-level shortcuts: every stage exists already
    again = kdm(recipe="cifar10", preset="smoke", root=str(done["root"]), dataset=cfg["dataset"], teacher=cfg["teacher"],
                pairs=cfg["pairs"], filter=cfg["filter"], student=cfg["student"])
    assert all(again[n]["skipped"] for n in STAGES)
    assert again["evaluation"]["version"] == res["evaluation"]["version"]


def test_a_multi_step_student_through_the_recipe_with_its_frontier(done, archive):
    """The cifar10 recipe with trajectory snapshots (EDM Heun steps), a student for 1 and 2 evaluations and the
    teacher cut short: the one pipeline, the stages before the pairs found done."""
    cfg = smoke(archive, done["root"], pairs={"sampler": {"snapshot_steps": [1]}},
                student={"model": {"nfe_train": [1, 2], "trajectory_rows": 8}}, evaluation={"teacher_nfe": [3]})
    with single_thread():
        res = stages.run_recipe(cfg, QUIET)
    assert [res[s]["skipped"] for s in STAGES] == [True, True, True, False, False, False, False]
    from pipeline.evaluation import image_metrics
    from pipeline.storage.pairstore import PairStore
    assert PairStore.open(res["filter"]["uri"]).manifest.snapshots.count == 1
    ev = res["evaluation"]
    assert {"fd_ratio_nfe2", "fd_ratio_teacher_nfe3", "fd_student_nfe2", "fd_teacher_nfe3"} <= set(ev)
    assert "frontier" in ev["plots"]
    subjects = {(m.name.split("-")[0], m.subject) for m in image_metrics.read_report(ev["report"]).metrics}
    assert {("FD", "student"), ("FD", "student-nfe2"), ("FD", "teacher-nfe3"), ("MSE", "teacher-nfe3")} <= subjects
    # the teacher's own sampler at the pairs' NFE (3 steps, 5 NFE) would reproduce its x_0; cut to 3 NFE it does not
    assert 0 < ev["fd_ratio_teacher_nfe3"]
