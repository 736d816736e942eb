"""Evaluation of an image student (``kdm evaluate`` and the cifar10 recipe's evaluation stage).

FD-<extractor id> / KID-<extractor id> of the teacher's and the student's outputs on the held-out seeds
against the dataset's train split (reference statistics cached under a root), their ratio,
student-vs-teacher MSE (and LPIPS-vgg when its backbone weights exist), a teacher | student grid and a
sample grid, into one directory artifact committed with its manifest last.

Quality against NFE: a multi-step student is scored again at each further NFE (subject ``student-nfe<m>``)
and, with ``teacher_nfe``, the teacher's EDM Heun sampler cut short (``teacher-nfe<k>``, from the same held-out
noise, MSE against the full teacher's x_0); the summary holds every FD and its ratio to the full teacher's
(``fd_ratio_nfe<m>``, ``fd_ratio_teacher_nfe<k>``) and ``frontier.png`` plots them against NFE.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.errors import KDMError
from pipeline.stages import check_device
from pipeline.storage import artifacts
from storage_schemas import SeedRange, code_version, recipe_version, stable_hash, utc_now
from storage_schemas.distill_image import ImageEvalStageConfig, ImageEvaluationManifest

GRID_TEACHER_STUDENT, GRID_STUDENT, FRONTIER = "teacher_student.png", "student_samples.png", "frontier.png"


def evenly_spaced(n: int, k: Optional[int]) -> np.ndarray:
    """Indices of an evenly spaced subset of k of n items (all of them when k is None or >= n)."""
    if k is None or k >= n:
        return np.arange(n)
    return np.linspace(0, n - 1, k).round().astype(np.int64)


def evaluation_version(dataset_content_hash: str, extractor_version_: str, pairs_version_: str,
                       student_version_: str, cfg: ImageEvalStageConfig) -> str:
    return "eval-img-" + stable_hash(recipe_version(), "evaluate-image", dataset_content_hash, extractor_version_,
                                     pairs_version_, student_version_, cfg.model_dump(mode="json",
                                                                                      exclude={"batch_size"}))


def read_evaluation_manifest(uri: str) -> ImageEvaluationManifest:
    return artifacts.read_model(artifacts.join(uri, artifacts.MANIFEST), ImageEvaluationManifest)


def evaluation_version_of(dataset_uri: str, extractor_uri: str, pairs_uri: str, student_uri: str,
                           cfg: ImageEvalStageConfig) -> str:
    from pipeline.data.datasets import open_image_dataset
    from pipeline.training.image_train import read_image_student_manifest
    from pipeline.storage.pairstore import PairStore
    return evaluation_version(open_image_dataset(dataset_uri).manifest.content_hash,
                              Path(str(extractor_uri).rstrip("/")).name, PairStore.open(pairs_uri).version,
                              read_image_student_manifest(student_uri).version, cfg)


def _teacher_cut_short(teacher_uri: str, settings, x_T: np.ndarray, labels: Optional[np.ndarray], num_classes: int,
                       device: str, batch: int) -> np.ndarray:
    """The teacher's x_0 from ``x_T`` with the EDM Heun ``settings`` (its pairs' sampler cut short), float32."""
    import torch
    from models.edm import FastDenoiser
    from models.samplers import edm_heun
    from pipeline.devices import resolve_device
    from pipeline.teachers.flow_matching import load_denoiser
    dev = resolve_device(device)
    net, _ = load_denoiser(teacher_uri, str(dev))
    state = torch.float64
    if settings.precision in ("bf16", "fp16"):
        net = FastDenoiser(net, dtype=torch.bfloat16 if settings.precision == "bf16" else torch.float16)
        state = torch.float32
    out = []
    for i in range(0, len(x_T), batch):
        xb = torch.from_numpy(np.ascontiguousarray(x_T[i:i + batch], np.float32)).to(dev)
        yb = (torch.eye(num_classes, device=dev)[torch.from_numpy(labels[i:i + batch].astype(np.int64)).to(dev)]
              if num_classes else None)
        out.append(edm_heun(net, xb, yb, num_steps=settings.steps, sigma_min=settings.sigma_min,
                            sigma_max=settings.noise_scale, rho=settings.rho, state_dtype=state).float().cpu().numpy())
    return np.concatenate(out)


def evaluate_image(out: str, dataset_uri: str, extractor_uri: str, pairs_uri: str, student_uri: str,
                   cfg: ImageEvalStageConfig, device: str, reference_root: str,
                   teacher_uri: Optional[str] = None) -> tuple[ImageEvaluationManifest, bool]:
    """Evaluate an image student into the directory artifact ``out`` (``kdm evaluate`` and the stage);
    returns (its manifest, whether it already held this evaluation). Reference statistics are cached
    under ``reference_root``. ``teacher_uri``: the teacher whose sampler ``cfg.teacher_nfe`` cuts short."""
    from pipeline.evaluation import features
    from pipeline.evaluation import image_metrics as im
    from pipeline.data.datasets import open_image_dataset
    from pipeline.training.image_train import read_image_student_manifest
    from pipeline.storage.pairstore import PairStore
    from pipeline.evaluation.sample import generate_images, load_image_student
    version = evaluation_version_of(dataset_uri, extractor_uri, pairs_uri, student_uri, cfg)
    if artifacts.check_target(out, version, read_evaluation_manifest):
        return read_evaluation_manifest(out), True
    ds = open_image_dataset(dataset_uri)
    fxm = features.read_extractor_manifest(extractor_uri)
    store = PairStore.open(pairs_uri)
    sm = read_image_student_manifest(student_uri)
    check_device(device, "evaluation")
    from pipeline.evaluation.nfe import check_nfe
    nfes = tuple(cfg.nfe) if cfg.nfe else sm.nfe_trained
    for m_ in nfes:
        check_nfe(m_, sm.nfe_trained, f"student {sm.version}")
    cut = []
    if cfg.teacher_nfe:
        sampler = store.manifest.sampler
        if teacher_uri is None or sampler is None or sampler.kind != "edm-heun":
            raise KDMError("evaluation.teacher_nfe cuts the teacher's EDM Heun sampler short: it needs the teacher "
                           "(the recipe's teacher stage) and pairs made with edm-heun")
        try:
            cut = [(k, sampler.at_nfe(k)) for k in cfg.teacher_nfe]
        except ValueError as e:
            raise KDMError(f"evaluation.teacher_nfe: {e}") from None
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
    # the student's training distance, named; refused when it ran on this evaluation's extractor network
    notes = {k: (f"{v['id']} (sha256 {v['sha256'][:16]})" if isinstance(v, dict) else str(v))
             for k, v in im.training_distance_notes(sm, fxm).items()}
    from pipeline.data.datasets import source_text
    notes["dataset_source"] = source_text(ds.manifest)     # FDs of different releases are not comparable
    lpips = None
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
               "mse_stderr": p_ms[0].stderr, "lpips": p_ms[1].value if len(p_ms) > 1 else None,
               **im.precision_recall_summary(t_ms + s_ms)}
    # the frontier: the student at its other NFEs, the teacher's sampler cut short; each FD against the full teacher's
    more: list = []
    points = {("student", 1): summary["fd_ratio"]}
    labels = hd["label"] if store.manifest.num_classes else None
    for m_ in [v for v in nfes if v > 1]:
        x = generate_images(student, hd["x_T"], labels if sm.model.label_dim else None, cfg.batch_size, nfe=m_)
        ms_ = im.distribution_metrics(im.quantize_uint8(x), fx, ref, subject=f"student-nfe{m_}", seeds=seeds,
                                      model_version=sm.version, batch_size=cfg.batch_size, **knobs)
        more += ms_ + im.paired_metrics(x, t_x0, seeds=seeds, pairs_version=held.version,
                                        subject=f"student-nfe{m_}", model_version=sm.version)
        summary[f"fd_student_nfe{m_}"], summary[f"fd_ratio_nfe{m_}"] = ms_[0].value, im.ratio(ms_[0], t_ms[0])
        points[("student", m_)] = summary[f"fd_ratio_nfe{m_}"]
    for k, settings in cut:
        x = _teacher_cut_short(teacher_uri, settings, hd["x_T"], labels, store.manifest.num_classes, device,
                               cfg.batch_size)
        ms_ = im.distribution_metrics(im.quantize_uint8(x), fx, ref, subject=f"teacher-nfe{k}", seeds=seeds,
                                      model_version=teacher_id, batch_size=cfg.batch_size, **knobs)
        more += ms_ + im.paired_metrics(x, t_x0, seeds=seeds, pairs_version=held.version, subject=f"teacher-nfe{k}",
                                        model_version=teacher_id)
        summary[f"fd_teacher_nfe{k}"], summary[f"fd_ratio_teacher_nfe{k}"] = ms_[0].value, im.ratio(ms_[0], t_ms[0])
        points[("teacher", k)] = summary[f"fd_ratio_teacher_nfe{k}"]
    if len(points) > 1:
        plots["frontier"] = FRONTIER
    collapsed = im.collapse_note(summary)
    if collapsed:
        notes["collapse"] = collapsed
    names = im.metric_names(fx.id)
    report = im.make_report(t_ms + s_ms + p_ms + more, plots=plots,
                            notes={"fd_ratio_student_over_teacher": summary["fd_ratio"], "student": sm.version,
                                   "teacher": teacher_id, "pairs": store.version, "dataset": ds.version,
                                   "dataset_source": notes["dataset_source"], **notes})
    tmp = artifacts.begin(out, fresh=True)
    with tempfile.TemporaryDirectory() as d:
        im.save_teacher_student_grid(t_x0[:g], s_x0[:g], Path(d, GRID_TEACHER_STUDENT))
        im.save_grid(s_x0[:g], Path(d, GRID_STUDENT), nrow=8)
        if "frontier" in plots:
            _plot_frontier(points, store.manifest.sampler.nfe if store.manifest.sampler else None, names["fd"],
                           Path(d, FRONTIER))
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


def _plot_frontier(points: dict, teacher_nfe: Optional[int], fd_name: str, path: Path) -> None:
    """FD / the full teacher's FD against NFE: the student at each NFE, the teacher's sampler cut short."""
    from pipeline.evaluation.frontier_plot import FrontierPanel, plot_frontier
    plot_frontier([FrontierPanel("quality against NFE", points, floor=1.0, ylabel=f"{fd_name} / the full teacher's")],
                  path, teacher_nfe, teacher_label="teacher (EDM Heun cut short)")
