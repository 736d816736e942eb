"""The CIFAR-10 distillation's stages over one artifact root, content-addressed:

  <root>/datasets/<version>/       <root>/extractors/<version>/     <root>/teachers/<id>/
  <root>/pairs/<version>/          <root>/students/<version>/       <root>/evaluations/<version>/
  <root>/reference-stats/<id>/     (cached by the evaluation)

Each function takes the root, input URIs and a typed config (storage_schemas.distill_image) and returns a
small dict (uri, version, skipped, summary numbers), never arrays; a stage whose output already exists
returns at once with ``skipped: True`` (and needs no GPU then). The GPU stages (teacher, pairs, student,
evaluation; the extractor when its device is cuda) take a device: asking for cuda where no GPU is
visible is a KDMError. ``plan_distill_image`` computes every stage's output URI and version without
running anything (as far as the inputs exist); ``run_distill_image`` runs them all without Prefect
(``kdm distill-image``); the Prefect flow ``distill-cifar10`` calls the same functions.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from storage_schemas import SeedRange, code_version, recipe_version, stable_hash, utc_now
from storage_schemas.distill_image import (DistillImageConfig, EvaluationStageRequest, ExtractorStageConfig,
                                           ExtractorStageRequest, ImageDatasetStageConfig, ImageEvalStageConfig,
                                           ImageEvaluationManifest, ImagePairsStageConfig, ImageStudentStageConfig,
                                           ImageTeacherStageConfig, PairsStageRequest, StudentStageRequest,
                                           TeacherStageRequest)

from pipeline.storage import artifacts
from pipeline.devices import resolve_device
from pipeline.errors import KDMError

CPU_POOL, GPU_POOL = "kdm-cpu", "kdm-gpu"
GRID_TEACHER_STUDENT, GRID_STUDENT = "teacher_student.png", "student_samples.png"


def _out(root: str, kind: str, version: str) -> str:
    return artifacts.join(root, kind, version)


def evenly_spaced(n: int, k: Optional[int]) -> np.ndarray:
    """Indices of an evenly spaced subset of k of n items (all of them when k is None or >= n)."""
    if k is None or k >= n:
        return np.arange(n)
    return np.linspace(0, n - 1, k).round().astype(np.int64)


def _require_device(device: str, stage: str) -> None:
    try:
        resolve_device(device)
    except KDMError as e:
        raise KDMError(f"{stage} stage: {e}") from None


# ----------------------------------------------------------------------------- versions (no work done)

def dataset_version(cfg: ImageDatasetStageConfig) -> str:
    from pipeline.data.datasets import dataset_version as version_of
    try:
        sha = artifacts.sha256_file(cfg.archive)
    except FileNotFoundError:
        raise KDMError(f"dataset archive {cfg.archive} does not exist; set dataset.archive to a CIFAR-10 "
                       f"ImageFolder tar.gz (train|test/<class>/<file>)") from None
    return version_of(sha, cfg.chunk_size)


def extractor_version(dataset_content_hash: str, cfg: ExtractorStageConfig) -> str:
    return "fx-" + stable_hash(recipe_version(), "extractor", dataset_content_hash, cfg.train, cfg.train_images)


def teacher_version(dataset_content_hash: str, cfg: ImageTeacherStageConfig) -> str:
    from pipeline.teachers.bootstrap import bootstrap_version
    return bootstrap_version(dataset_content_hash, cfg.bootstrap)


def pairs_version(teacher_id: str, cfg: ImagePairsStageConfig) -> str:
    from pipeline.pairs.generate import pairs_version as version_of
    return version_of(teacher_id, cfg.generate_config("cpu"))   # the device is not part of the version


def student_version(pairs_version_: str, cfg: ImageStudentStageConfig) -> str:
    from pipeline.training.image_train import image_run_version
    return image_run_version(pairs_version_, cfg.model, cfg.train)


def evaluation_version(dataset_content_hash: str, extractor_version_: str, pairs_version_: str,
                       student_version_: str, cfg: ImageEvalStageConfig) -> str:
    return "eval-img-" + stable_hash(recipe_version(), "evaluate-image", dataset_content_hash, extractor_version_,
                                     pairs_version_, student_version_, cfg.model_dump(mode="json",
                                                                                      exclude={"batch_size"}))


# ----------------------------------------------------------------------------- stages

def stage_dataset(root: str, cfg: ImageDatasetStageConfig, progress: bool = False) -> dict:
    from pipeline.data.datasets import prepare_image_dataset
    version = dataset_version(cfg)
    out = _out(root, "datasets", version)
    skipped = artifacts.exists(out)
    m = prepare_image_dataset(cfg.archive, out, chunk_size=cfg.chunk_size, progress=progress)
    return {"uri": out, "version": m.version, "content_hash": m.content_hash, "skipped": skipped,
            "classes": len(m.class_names), "image_shape": list(m.image_shape),
            **{f"{s}_images": info.count for s, info in m.splits.items()}}


def stage_extractor(root: str, dataset_uri: str, cfg: ExtractorStageConfig, progress: bool = False) -> dict:
    from pipeline.evaluation import features
    from pipeline.data.datasets import open_image_dataset
    ds = open_image_dataset(dataset_uri)
    version = extractor_version(ds.manifest.content_hash, cfg)
    out = _out(root, "extractors", version)
    skipped = artifacts.committed(out)
    if skipped:
        m = features.read_extractor_manifest(out)
    else:
        _require_device(cfg.device, "extractor")
        x, y = ds.load("train")
        idx = evenly_spaced(len(x), cfg.train_images)
        xt, yt = ds.load("test") if "test" in ds.manifest.splits else (None, None)
        m = features.train_extractor(x[idx], y[idx], cfg.train, out, test_images=xt, test_labels=yt,
                                     dataset_id=ds.version, device=cfg.device, progress=progress)
    return {"uri": out, "version": version, "id": m.id, "sha256": m.weights_sha256, "skipped": skipped,
            "test_accuracy": m.test_accuracy, "feature_dim": m.feature_dim, "train_images": m.train_images,
            "trained_on": m.device}


def _check_teacher(uri: str, conditional: bool):
    from pipeline.teachers.flow_matching import read_teacher_manifest
    try:
        m = read_teacher_manifest(uri)
    except KDMError as e:
        raise KDMError(f"teacher {uri} is not a readable teacher artifact: {e}") from None
    if m.kind != "edm":
        raise KDMError(f"teacher {uri} is a {m.kind} teacher; image distillation needs an EDM teacher "
                       f"(kdm teacher bootstrap / kdm teacher import-edm)")
    if bool(m.model.label_dim) != conditional:
        raise KDMError(f"teacher {uri} is {'class-conditional' if m.model.label_dim else 'unconditional'} "
                       f"(label_dim {m.model.label_dim}) but the run has conditional={conditional}: set "
                       f"conditional={not conditional} (deployment distill-cifar10{'-cond' if not conditional else ''})")
    return m


def stage_image_teacher(root: str, dataset_uri: str, cfg: ImageTeacherStageConfig, device: str,
                        progress: bool = False, on_log: Optional[Callable[[dict], None]] = None) -> dict:
    """Bootstrap an EDM teacher on the dataset, or verify (sha256 of its weights) and use ``cfg.teacher_uri``."""
    if cfg.teacher_uri:
        m = _check_teacher(cfg.teacher_uri, cfg.conditional)
        artifacts.read_verified(artifacts.join(cfg.teacher_uri, m.weights_file), m.weights_sha256, "teacher")
        return {"uri": cfg.teacher_uri, "version": m.id, "sha256": m.weights_sha256, "skipped": True, "given": True,
                "label_dim": m.model.label_dim, "final_loss": m.final_loss}
    from pipeline.data.datasets import open_image_dataset
    from pipeline.teachers.flow_matching import read_teacher_manifest
    from pipeline.teachers.bootstrap import train_edm_teacher
    dm = open_image_dataset(dataset_uri).manifest
    version = teacher_version(dm.content_hash, cfg)
    out = _out(root, "teachers", version)
    skipped = artifacts.committed(out)
    resumed: list[int] = []
    if skipped:
        m = read_teacher_manifest(out)
    else:
        _require_device(device, "teacher")
        m = train_edm_teacher(dataset_uri, cfg.bootstrap.model_copy(update={"device": device}), out,
                              progress=progress, on_log=on_log, on_resume=resumed.append)
    _check_teacher(out, cfg.conditional)
    return {"uri": out, "version": m.id, "sha256": m.weights_sha256, "skipped": skipped, "given": False,
            "label_dim": m.model.label_dim, "final_loss": m.final_loss,
            "resumed_from_step": resumed[0] if resumed else None}


def _config_file(d: str, data: dict) -> str:
    """``data`` as JSON in directory ``d`` (the typed config a torchrun command reads with --config)."""
    import json
    path = Path(d, "config.json")
    path.write_text(json.dumps(data, indent=2))
    return str(path)


def stage_image_pairs(root: str, teacher_uri: str, cfg: ImagePairsStageConfig, device: str, progress: bool = False,
                      on_shard: Optional[Callable[[int, int], None]] = None, gpus: int = 1) -> dict:
    """EDM Heun pairs of the teacher at ``<root>/pairs/<version>``. ``gpus`` > 1: ``kdm pairs generate-images``
    in that many processes under torchrun (the shards split over them; the store is the same whatever the
    count; ``on_shard`` is not called then, the command's output is forwarded instead)."""
    from pipeline.pairs import generate
    from pipeline.storage.pairstore import PairStore
    from pipeline.teachers.flow_matching import read_teacher_manifest
    tm = read_teacher_manifest(teacher_uri)
    version = pairs_version(tm.id, cfg)
    out = _out(root, "pairs", version)
    skipped = artifacts.exists(out)
    if not skipped:
        _require_device(device, "pairs")
        if gpus == 1:
            generate.generate_pairs(teacher_uri, cfg.generate_config(device), out, progress=progress,
                                    on_shard=on_shard, batch_size=cfg.batch_size)
        else:
            from pipeline.training.torchrun import check_processes, run_torchrun
            check_processes(gpus, device, "pairs stage")
            with tempfile.TemporaryDirectory(prefix="kdm-pairs-") as d:
                args = ["pairs", "generate-images", "--teacher", teacher_uri, "--out", out,
                        "--config", _config_file(d, cfg.generate_config(device).model_dump(mode="json"))]
                args += ["--batch", str(cfg.batch_size)] if cfg.batch_size else []
                run_torchrun(gpus, device, args + ([] if progress else ["-q"]), "pairs stage")
            if not artifacts.exists(out):
                raise KDMError(f"pairs stage: the {gpus} torchrun processes exited without committing {out}")
    s = PairStore.open(out)
    held = s.heldout()
    return {"uri": out, "version": s.version, "content_hash": s.manifest.content_hash, "count": len(s),
            "heldout_count": len(held) if held else 0, "skipped": skipped, "teacher_id": tm.id,
            "nfe": cfg.sampler.nfe}


def stage_image_student(root: str, pairs_uri: str, cfg: ImageStudentStageConfig, device: str, progress: bool = False,
                        on_log: Optional[Callable[[dict], None]] = None, gpus: int = 1,
                        on_checkpoint: Optional[Callable[[int, object], None]] = None) -> dict:
    """The image KDM student at ``<root>/students/<version>``. ``gpus`` > 1: ``kdm train-image`` under torchrun
    (DDP, each process ``train.batch_size / gpus`` pairs per step; the version is the same whatever the
    count; ``on_log`` is not called then, the command's output is forwarded instead). ``on_checkpoint(step,
    ema)`` (one process only) sees the EMA model after every checkpoint, e.g. for preview grids."""
    from pipeline.training.image_train import read_image_student_manifest, train_image_student
    from pipeline.storage.pairstore import PairStore
    store = PairStore.open(pairs_uri)
    if store.manifest.num_classes and not cfg.model.label_dim:
        raise KDMError(f"pairs {pairs_uri} come from a class-conditional teacher ({store.manifest.num_classes} "
                       f"classes) but the student is unconditional: set conditional=true")
    version = student_version(store.version, cfg)
    out = _out(root, "students", version)
    skipped = artifacts.committed(out)
    resumed: list[int] = []
    if not skipped:
        _require_device(device, "student")
        train_cfg = cfg.train.model_copy(update={"device": device})
        if gpus == 1:
            train_image_student(pairs_uri, cfg.model, train_cfg, out, device=device, preset=cfg.preset,
                                progress=progress, on_log=on_log, on_resume=resumed.append,
                                on_checkpoint=on_checkpoint)
        else:
            from pipeline.training.torchrun import check_processes, run_torchrun
            if on_checkpoint is not None:
                raise KDMError("student stage: on_checkpoint needs gpus=1 (the torchrun processes train elsewhere)")
            if train_cfg.batch_size % gpus:
                raise KDMError(f"student stage: train.batch_size {train_cfg.batch_size} is not divisible by "
                               f"gpus={gpus} (each process takes batch_size / gpus pairs per step)")
            check_processes(gpus, device, "student stage")
            with tempfile.TemporaryDirectory(prefix="kdm-student-") as d:
                conf = _config_file(d, cfg.model_copy(update={"train": train_cfg}).model_dump(mode="json"))
                args = ["train-image", "--pairs", pairs_uri, "--config", conf, "--device", device, "--out", out]
                run_torchrun(gpus, device, args + ([] if progress else ["-q"]), "student stage")
            if not artifacts.committed(out):
                raise KDMError(f"student stage: the {gpus} torchrun processes exited without committing {out}")
    m = read_image_student_manifest(out)
    return {"uri": out, "version": m.version, "weights_sha256": m.weights_sha256, "skipped": skipped,
            "resumed_from_step": resumed[0] if resumed else None,
            "steps": m.steps_done, "nonfinite_steps": m.nonfinite_steps, "final_losses": m.final_losses,
            "train_seconds": m.train_seconds, "trainable_parameters": m.trainable_parameters}


def read_evaluation_manifest(uri: str) -> ImageEvaluationManifest:
    return artifacts.read_model(artifacts.join(uri, artifacts.MANIFEST), ImageEvaluationManifest)


def _evaluation_summary(uri: str, m: ImageEvaluationManifest, skipped: bool) -> dict:
    return {"uri": uri, "version": m.version, "report": artifacts.join(uri, m.report_file), "skipped": skipped,
            "num_samples": m.num_samples, "metric_names": m.metric_names, "plots": m.plots, "notes": m.notes,
            **m.summary}



def stage_image_evaluate(root: str, dataset_uri: str, extractor_uri: str, pairs_uri: str, student_uri: str,
                         cfg: ImageEvalStageConfig, device: str, progress: bool = False) -> dict:
    """FD-<extractor id> / KID-<extractor id> of the teacher's and the student's outputs on the held-out seeds
    against the train split, their ratio, student-vs-teacher MSE (and LPIPS-vgg when its backbone weights
    exist), a teacher | student grid and a sample grid, at ``<root>/evaluations/<version>``."""
    version = _evaluation_version_of(dataset_uri, extractor_uri, pairs_uri, student_uri, cfg)
    out = _out(root, "evaluations", version)
    m, skipped = evaluate_image(out, dataset_uri, extractor_uri, pairs_uri, student_uri, cfg, device, root)
    return _evaluation_summary(out, m, skipped)


def _evaluation_version_of(dataset_uri: str, extractor_uri: str, pairs_uri: str, student_uri: str,
                           cfg: ImageEvalStageConfig) -> str:
    from pipeline.data.datasets import open_image_dataset
    from pipeline.training.image_train import read_image_student_manifest
    from pipeline.storage.pairstore import PairStore
    return evaluation_version(open_image_dataset(dataset_uri).manifest.content_hash,
                              Path(str(extractor_uri).rstrip("/")).name, PairStore.open(pairs_uri).version,
                              read_image_student_manifest(student_uri).version, cfg)


def evaluate_image(out: str, dataset_uri: str, extractor_uri: str, pairs_uri: str, student_uri: str,
                   cfg: ImageEvalStageConfig, device: str, reference_root: str) -> tuple[ImageEvaluationManifest, bool]:
    """Evaluate an image student into the directory artifact ``out`` (``kdm evaluate`` and the stage);
    returns (its manifest, whether it already held this evaluation). Reference statistics are cached
    under ``reference_root``."""
    from pipeline.evaluation import features
    from pipeline.evaluation import image_metrics as im
    from pipeline.data.datasets import open_image_dataset
    from pipeline.training.image_train import read_image_student_manifest
    from pipeline.storage.pairstore import PairStore
    from pipeline.evaluation.sample import generate_images, load_image_student
    version = _evaluation_version_of(dataset_uri, extractor_uri, pairs_uri, student_uri, cfg)
    if artifacts.check_target(out, version, read_evaluation_manifest):
        return read_evaluation_manifest(out), True
    ds = open_image_dataset(dataset_uri)
    fxm = features.read_extractor_manifest(extractor_uri)
    store = PairStore.open(pairs_uri)
    sm = read_image_student_manifest(student_uri)
    _require_device(device, "evaluation")
    held = store.heldout()
    if held is None or held.manifest.seeds is None:
        raise KDMError(f"pairs {pairs_uri} have no held-out split with seeds: generate them with held-out seeds")
    n = min(cfg.num_samples or len(held), len(held))
    if n < 2:
        raise KDMError(f"the evaluation needs at least 2 held-out pairs, {pairs_uri} has {len(held)}")
    hd = {k: v[:n] for k, v in held.load(("x_T", "x_0", "label")).items()}
    seeds = SeedRange(start=held.manifest.seeds.start, stop=held.manifest.seeds.start + n)

    x_train, _ = ds.load("train")
    x_ref = x_train[evenly_spaced(len(x_train), cfg.reference_images)]
    fx = features.load_extractor(extractor_uri, device)
    ref = im.reference_stats(x_ref, dataset_id=ds.version, split="train", extractor=fx, root=reference_root)
    student, _ = load_image_student(student_uri, device)
    s_x0 = generate_images(student, hd["x_T"], hd["label"] if sm.model.label_dim else None, cfg.batch_size)
    t_x0 = hd["x_0"].astype(np.float32)
    knobs = dict(kid_subsets=cfg.kid_subsets, kid_subset_size=min(cfg.kid_subset_size, n, len(x_ref)),
                 kid_seed=cfg.kid_seed)
    teacher_id = store.manifest.teacher.id if store.manifest.teacher else None
    t_ms = im.distribution_metrics(im.quantize_uint8(t_x0), fx, ref, subject="teacher", seeds=seeds,
                                   model_version=teacher_id, batch_size=cfg.batch_size, **knobs)
    s_ms = im.distribution_metrics(im.quantize_uint8(s_x0), fx, ref, subject="student", seeds=seeds,
                                   model_version=sm.version, batch_size=cfg.batch_size, **knobs)
    lpips, notes = None, {}
    if cfg.lpips:
        try:
            lpips = im.load_lpips("vgg", device=device)
        except im.MetricUnavailable as e:
            notes["lpips"] = f"not computed: {e}"
    else:
        notes["lpips"] = "not computed: evaluation.lpips is false"
    p_ms = im.paired_metrics(s_x0, t_x0, seeds=seeds, pairs_version=held.version, lpips=lpips,
                             model_version=sm.version)
    g = min(cfg.grid_images, n)
    plots = {"teacher_student": GRID_TEACHER_STUDENT, "student_samples": GRID_STUDENT}
    summary = {"fd_teacher": t_ms[0].value, "fd_student": s_ms[0].value, "fd_ratio": im.ratio(s_ms[0], t_ms[0]),
               "kid_teacher": t_ms[1].value, "kid_student": s_ms[1].value, "mse": p_ms[0].value,
               "lpips": p_ms[1].value if len(p_ms) > 1 else None}
    names = im.metric_names(fx.id)
    report = im.make_report(t_ms + s_ms + p_ms, plots=plots,
                            notes={"fd_ratio_student_over_teacher": summary["fd_ratio"], "student": sm.version,
                                   "teacher": teacher_id, "pairs": store.version, "dataset": ds.version, **notes})
    tmp = artifacts.begin(out, fresh=True)
    with tempfile.TemporaryDirectory() as d:
        im.save_teacher_student_grid(t_x0[:g], s_x0[:g], Path(d, GRID_TEACHER_STUDENT))
        im.save_grid(s_x0[:g], Path(d, GRID_STUDENT), nrow=8)
        for f in plots.values():
            artifacts.write_bytes(artifacts.join(tmp, f), Path(d, f).read_bytes())
    im.write_report(report, tmp)
    m = ImageEvaluationManifest(version=version, dataset_version=ds.version, extractor_id=fxm.id, teacher_id=teacher_id,
                                pairs_version=store.version, student_version=sm.version, config=cfg, plots=plots,
                                summary=summary, metric_names=names, notes=notes, num_samples=n,
                                code_version=code_version(), created=utc_now())
    artifacts.write_json(artifacts.join(tmp, artifacts.MANIFEST), m)
    artifacts.commit(out)
    return m, False


# ----------------------------------------------------------------------------- GPU stage requests

def run_stage_request(req, progress: bool = False, on_log: Optional[Callable[[dict], None]] = None,
                      on_shard: Optional[Callable[[int, int], None]] = None) -> dict:
    """Run one stage described by a storage_schemas.distill_image.StageRequest (the ``gpu-stage`` flow)."""
    if isinstance(req, ExtractorStageRequest):
        return stage_extractor(req.root, req.dataset_uri, req.config.model_copy(update={"device": req.device}),
                               progress)
    if isinstance(req, TeacherStageRequest):
        return stage_image_teacher(req.root, req.dataset_uri, req.config, req.device, progress, on_log)
    if isinstance(req, PairsStageRequest):
        return stage_image_pairs(req.root, req.teacher_uri, req.config, req.device, progress, on_shard, gpus=req.gpus)
    if isinstance(req, StudentStageRequest):
        return stage_image_student(req.root, req.pairs_uri, req.config, req.device, progress, on_log, gpus=req.gpus)
    if isinstance(req, EvaluationStageRequest):
        return stage_image_evaluate(req.root, req.dataset_uri, req.extractor_uri, req.pairs_uri, req.student_uri,
                                    req.config, req.device, progress)
    raise KDMError(f"unknown stage request {type(req).__name__}")


def stage_output(req) -> tuple[str, bool]:
    """(output URI, whether it is committed) of the stage a StageRequest describes, computed from its inputs'
    manifests without running anything (the flow uses it to skip finished GPU stages and to check that a
    GPU worker's output is visible from here)."""
    from pipeline.data.datasets import open_image_dataset
    from pipeline.storage.pairstore import PairStore
    from pipeline.teachers.flow_matching import read_teacher_manifest
    if isinstance(req, ExtractorStageRequest):
        v = extractor_version(open_image_dataset(req.dataset_uri).manifest.content_hash, req.config)
        out = _out(req.root, "extractors", v)
    elif isinstance(req, TeacherStageRequest):
        if req.config.teacher_uri:
            return req.config.teacher_uri, artifacts.committed(req.config.teacher_uri)
        out = _out(req.root, "teachers", teacher_version(open_image_dataset(req.dataset_uri).manifest.content_hash,
                                                          req.config))
    elif isinstance(req, PairsStageRequest):
        out = _out(req.root, "pairs", pairs_version(read_teacher_manifest(req.teacher_uri).id, req.config))
        return out, artifacts.exists(out)
    elif isinstance(req, StudentStageRequest):
        out = _out(req.root, "students", student_version(PairStore.open(req.pairs_uri).version, req.config))
    elif isinstance(req, EvaluationStageRequest):
        out = _out(req.root, "evaluations", _evaluation_version_of(req.dataset_uri, req.extractor_uri, req.pairs_uri,
                                                                   req.student_uri, req.config))
    else:
        raise KDMError(f"unknown stage request {type(req).__name__}")
    return out, artifacts.committed(out)


# ----------------------------------------------------------------------------- plan and run

def resolve_paths(cfg: DistillImageConfig, base) -> DistillImageConfig:
    """Relative local paths (root, dataset.archive, teacher_uri) are taken relative to ``base``."""
    def res(v: Optional[str]) -> Optional[str]:
        if v and artifacts.is_local(v) and not Path(v).is_absolute():
            return str((Path(base) / v).resolve())
        return v
    return cfg.model_copy(update={"root": res(cfg.root), "teacher_uri": res(cfg.teacher_uri),
                                  "dataset": cfg.dataset.model_copy(update={"archive": res(cfg.dataset.archive)})})


def stage_pool(cfg: DistillImageConfig, stage: str) -> Optional[str]:
    """The work pool a stage runs on in the flow (None: nothing to run, the teacher is given)."""
    if stage == "teacher" and cfg.teacher_uri:
        return None
    if stage == "extractor":
        return GPU_POOL if cfg.extractor.device == "cuda" else CPU_POOL
    return CPU_POOL if stage == "dataset" else GPU_POOL


def plan_distill_image(cfg: DistillImageConfig) -> dict:
    """Dry run: each stage's output URI, version and whether it exists, without running anything.

    Returns ``{"preset", "conditional", "root", "stages": {name: {"uri", "version", "exists", "pool"}},
    "todo": [names not yet done], "complete": bool}`` for the stages dataset, extractor, teacher, pairs,
    student, evaluation. A version that depends on an output not yet made (e.g. the bootstrapped teacher
    on the prepared dataset) is None, with ``"after": <stage>``. With ``teacher_uri`` the teacher is
    verified to be a readable EDM teacher of the right conditioning, and pairs and student versions are
    known at once: ``plan["stages"]["student"]["exists"]`` says whether that teacher already has its student.
    """
    from pipeline.data.datasets import open_image_dataset
    root = cfg.root
    stages: dict[str, dict] = {}

    def add(name: str, version: Optional[str], kind: str, after: Optional[str] = None, **extra) -> None:
        uri = _out(root, kind, version) if version else None
        entry = {"uri": uri, "version": version, "exists": bool(uri) and artifacts.exists(
            uri if kind in ("datasets", "pairs") else artifacts.join(uri, artifacts.MANIFEST)),
                 "pool": stage_pool(cfg, name)}
        if after:
            entry["after"] = after
        stages[name] = {**entry, **extra}

    dsv = dataset_version(cfg.dataset)
    add("dataset", dsv, "datasets")
    content = open_image_dataset(stages["dataset"]["uri"]).manifest.content_hash if stages["dataset"]["exists"] \
        else None
    fxv = extractor_version(content, cfg.extractor) if content else None
    add("extractor", fxv, "extractors", None if fxv else "dataset")
    if cfg.teacher_uri:
        tm = _check_teacher(cfg.teacher_uri, cfg.conditional)
        stages["teacher"] = {"uri": cfg.teacher_uri, "version": tm.id, "exists": True, "pool": None, "given": True}
        tid = tm.id
    else:
        tid = teacher_version(content, cfg.teacher_stage()) if content else None
        add("teacher", tid, "teachers", None if tid else "dataset")
    pv = pairs_version(tid, cfg.pairs) if tid else None
    add("pairs", pv, "pairs", None if pv else "teacher")
    sv = student_version(pv, cfg.student) if pv else None
    add("student", sv, "students", None if sv else "pairs")
    ev = evaluation_version(content, fxv, pv, sv, cfg.evaluation) if (sv and fxv) else None
    add("evaluation", ev, "evaluations", None if ev else ("student" if not sv else "extractor"))
    todo = [n for n, s in stages.items() if not s["exists"]]
    return {"preset": cfg.preset, "conditional": cfg.conditional, "root": root, "stages": stages, "todo": todo,
            "complete": not todo}


def format_plan(plan: dict) -> str:
    lines = [f"{'stage':<11} {'state':<8} {'pool':<8} version / uri"]
    for name, s in plan["stages"].items():
        state = "given" if s.get("given") else ("done" if s["exists"] else "to do")
        where = s["uri"] or f"(known after the {s.get('after')} stage)"
        lines.append(f"{name:<11} {state:<8} {s['pool'] or '-':<8} {where}")
    return "\n".join(lines)


def run_distill_image(cfg: DistillImageConfig, progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Every stage of the CIFAR-10 distillation in this process, without Prefect (``kdm distill-image``)."""
    root, dev = cfg.root, cfg.device
    r: dict = {}
    r["dataset"] = stage_dataset(root, cfg.dataset, progress)
    log(f"dataset    {r['dataset']['uri']} ({r['dataset'].get('train_images', 0)} train images)")
    r["extractor"] = stage_extractor(root, r["dataset"]["uri"], cfg.extractor, progress)
    log(f"extractor  {r['extractor']['uri']} (test accuracy {r['extractor']['test_accuracy']})")
    r["teacher"] = stage_image_teacher(root, r["dataset"]["uri"], cfg.teacher_stage(), dev, progress)
    log(f"teacher    {r['teacher']['uri']}" + (" (given)" if r["teacher"]["given"] else ""))
    r["pairs"] = stage_image_pairs(root, r["teacher"]["uri"], cfg.pairs, dev, progress, gpus=cfg.gpus)
    log(f"pairs      {r['pairs']['uri']} ({r['pairs']['count']} + {r['pairs']['heldout_count']} held out, "
        f"{r['pairs']['nfe']} NFE)")
    r["student"] = stage_image_student(root, r["pairs"]["uri"], cfg.student, dev, progress, gpus=cfg.gpus)
    log(f"student    {r['student']['uri']} ({r['student']['steps']} steps)")
    r["evaluation"] = stage_image_evaluate(root, r["dataset"]["uri"], r["extractor"]["uri"], r["pairs"]["uri"],
                                           r["student"]["uri"], cfg.evaluation, dev, progress)
    log(f"report     {r['evaluation']['report']}")
    return r
