"""Evaluation of a 2-D student against its teacher's pairs (paper Sec. 6.1, App. E.6).

Protocol (storage_schemas.Eval2DConfig, recorded in every report): n = min(num_samples, held-out,
train) points per row. Reference R = the first n held-out x_0. Student row: n one-step samples from
fresh seeds. Teacher row: the first n x_0 of the train split, i.e. teacher samples independent of R.
Both rows: in-cell fraction, SWD to R, outlier rate. Pair MSE: student(x_T) vs teacher x_0 on the n
held-out pairs.

Quality against NFE (the frontier): the student row is repeated at every NFE it samples with
(``cfg.nfe``, default the NFEs it was trained for) on the same seeds and held-out pairs; with
``cfg.teacher_nfe`` and the teacher network, the teacher's own sampler cut short to each NFE
(``SamplerSettings.at_nfe``) is scored the same way from the same seeds, its pair MSE against the full
teacher's held-out x_0. The report's ``frontier`` lists every point and ``frontier.png`` plots SWD,
in-cell fraction and outliers against NFE, with the full teacher's x_0 as the floor.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from storage_schemas import Eval2DConfig, EvaluationReport, MetricSet, SeedRange, code_version, utc_now
from storage_schemas.evaluation import FrontierPoint

from pipeline.storage import artifacts
from pipeline.errors import KDMError
from pipeline.storage.manifests import read_student_manifest

REPORT = "report.json"


def _metric_set(points: np.ndarray, reference: np.ndarray, cfg: Eval2DConfig, board,
                paired: Optional[tuple[np.ndarray, np.ndarray]] = None, pair_mse=None) -> MetricSet:
    """The metrics of ``points`` against ``reference``; with ``paired`` (outputs, held-out x_0), the pair MSE
    and its standard error (or ``pair_mse`` as given)."""
    from pipeline.evaluation import metrics2d
    from pipeline.evaluation.paired import pair_errors, standard_error
    stderr = None
    if paired is not None:
        err = pair_errors(*paired)
        pair_mse, stderr = float(err.mean()), standard_error(err)
    m = metrics2d.checkerboard_metrics(points, reference, swd_projections=cfg.swd_projections, swd_seed=cfg.swd_seed,
                                       eps=cfg.dbscan_eps, min_samples=cfg.dbscan_min_samples,
                                       z=cfg.zscore_threshold, low=board.low, high=board.high, scale=board.scale)
    return MetricSet(in_cell_fraction=m["in_cell_fraction"], swd=m["swd"], outlier_rate=m["outlier_rate"],
                     pair_mse=pair_mse, pair_mse_stderr=stderr, num_points=m["num_points"])


def evaluate_student(run: str, pairs_url: str, cfg: Eval2DConfig, out_dir: str,
                     board=None, teacher: str | None = None) -> EvaluationReport:
    """Writes the plots, then ``report.json``, into ``out_dir`` (a local directory or a remote URL);
    returns the report. The inputs are checked and read (every chunk verified) before torch is imported.
    ``teacher``: the teacher run whose sampler ``cfg.teacher_nfe`` cuts short (needed then)."""
    from storage_schemas import CheckerboardSpec
    from pipeline.storage.pairstore import PairStore
    board = board or CheckerboardSpec()
    store = PairStore.open(pairs_url)
    held = store.heldout()
    if held is None:
        raise KDMError(f"{pairs_url} has no held-out split (child group 'heldout'); generate pairs with "
                       f"--heldout-seeds or import with --holdout > 0")
    student = read_student_manifest(run)
    if tuple(store.manifest.sample_shape) != (student.model.dim,):
        raise KDMError(f"student {run} generates {student.model.dim}-D points but {pairs_url} holds samples of shape "
                       f"{tuple(store.manifest.sample_shape)}; evaluate it on pairs of its own dimension")
    nfes = tuple(cfg.nfe) if cfg.nfe else student.nfe_trained
    from pipeline.evaluation.nfe import check_nfe
    for nfe in nfes:
        check_nfe(nfe, student.nfe_trained, f"student {student.version}")
    teacher_settings = _teacher_settings(cfg, store.manifest, teacher)
    n = min(cfg.num_samples, len(held), len(store))
    if n < 20:
        raise KDMError(f"{pairs_url} has {len(store)} train and {len(held)} held-out pairs; at least 20 of each "
                       f"are needed")
    hd = {k: held.read(k, 0, n) for k in ("x_T", "x_0")}
    reference, teacher_x0 = hd["x_0"], store.read("x_0", 0, n)
    from pipeline.evaluation.sample import generate, load_student, noise_for_seeds
    model, student = load_student(run)
    seeds = SeedRange(start=cfg.sample_seed, stop=cfg.sample_seed + n)
    noise = noise_for_seeds(range(seeds.start, seeds.stop), student.model.dim, store.manifest.x_T_scale)
    frontier, samples = [], {}
    for nfe in sorted(set(nfes) | {1}):
        fresh, paired = generate(model, noise, nfe=nfe), generate(model, hd["x_T"], nfe=nfe)
        ms = _metric_set(fresh, reference, cfg, board, paired=(paired, hd["x_0"]))
        samples[nfe] = (fresh, paired)
        if nfe in nfes:
            frontier.append(FrontierPoint(model="student", nfe=nfe, metrics=ms))
        if nfe == 1:
            student_ms = ms
    if teacher_settings:
        from models.samplers import integrate_ode
        from pipeline.teachers.flow_matching import load_teacher
        import torch
        velocity, _ = load_teacher(teacher)
        for nfe, s in teacher_settings:
            with torch.no_grad():
                fresh, paired = (integrate_ode(velocity, torch.from_numpy(np.ascontiguousarray(x, np.float32)),
                                               s.steps, s.method).numpy() for x in (noise, hd["x_T"]))
            frontier.append(FrontierPoint(model="teacher", nfe=nfe, sampler=s, metrics=_metric_set(
                fresh, reference, cfg, board, paired=(paired, hd["x_0"]))))
    teacher_ms = _metric_set(teacher_x0, reference, cfg, board, pair_mse=0.0)
    sampler = store.manifest.sampler
    teacher_full_nfe = sampler.nfe if sampler is not None else None
    plots: dict[str, str] = {}
    if cfg.plots:
        best = max(nfes)
        plots = _write_plots(out_dir, samples[1][0], teacher_x0, hd["x_T"], samples[1][1], hd["x_0"], student.version,
                             frontier=frontier, teacher_ms=teacher_ms, teacher_full_nfe=teacher_full_nfe,
                             extra=(best, samples[best][0]) if best > 1 else None)
    report = EvaluationReport(student_version=student.version, pairs_version=store.version,
                              heldout_version=held.version, teacher_id=student.teacher_id,
                              protocol=cfg, sample_seeds=seeds, student=student_ms,
                              teacher_reference=teacher_ms, teacher_nfe=teacher_full_nfe, frontier=frontier,
                              plots=plots, code_version=code_version(), created=utc_now())
    artifacts.write_json(artifacts.join(out_dir, REPORT), report)
    return report


def _teacher_settings(cfg: Eval2DConfig, manifest, teacher: str | None) -> list:
    """[(nfe, SamplerSettings)] of the teacher sampler cut short to ``cfg.teacher_nfe`` (empty when unset)."""
    if not cfg.teacher_nfe:
        return []
    if teacher is None:
        raise KDMError("evaluation.teacher_nfe cuts the teacher's sampler short: it needs the teacher network (the "
                       "recipe's own teacher, or `kdm evaluate --teacher DIR`); imported pairs have none")
    from pipeline.storage.manifests import read_teacher_manifest
    tm = read_teacher_manifest(teacher)
    if manifest.teacher is not None and manifest.teacher.id != tm.id:
        raise KDMError(f"teacher {teacher} is {tm.id}, but the pairs were made by {manifest.teacher.id}")
    if tm.kind != "flow-matching-mlp" or manifest.sampler is None or manifest.sampler.kind != "flow-matching-ode":
        raise KDMError(f"the 2-D evaluation cuts short a flow-matching teacher's ODE solver; {teacher} is {tm.kind} "
                       f"and the pairs' sampler is {manifest.sampler.kind if manifest.sampler else 'not recorded'}")
    try:
        return [(nfe, manifest.sampler.at_nfe(nfe)) for nfe in cfg.teacher_nfe]
    except ValueError as e:
        raise KDMError(f"evaluation.teacher_nfe: {e}") from None


def _write_plots(out_dir: str, fresh, teacher_x0, x_T, paired, x_0, student_version: str, frontier=(),
                 teacher_ms=None, teacher_full_nfe=None, extra=None) -> dict[str, str]:
    """The report's PNGs, drawn into ``out_dir`` (local) or drawn locally and uploaded (remote URL). ``extra``:
    (nfe, samples) of a multi-step student, drawn beside its one-step samples."""
    plots = {"samples": "samples.png", "noise_structure_student": "noise_structure_student.png",
             "noise_structure_teacher": "noise_structure_teacher.png"}
    if frontier and (len(frontier) > 1 or any(p.model == "teacher" for p in frontier)):
        plots["frontier"] = "frontier.png"
    if extra is not None:
        plots["samples_multistep"] = f"samples_nfe{extra[0]}.png"

    from pipeline.evaluation import metrics2d

    def draw(d: Path) -> None:
        metrics2d.plot_samples(fresh, teacher_x0, str(d / plots["samples"]), title=f"student {student_version}")
        metrics2d.plot_noise_structure(x_T, paired, str(d / plots["noise_structure_student"]),
                                       title="student: x_T coloured by the cell of student(x_T)")
        metrics2d.plot_noise_structure(x_T, x_0, str(d / plots["noise_structure_teacher"]),
                                       title="teacher: x_T coloured by the cell of teacher x_0")
        if "frontier" in plots:
            metrics2d.plot_frontier(frontier, teacher_ms, str(d / plots["frontier"]), teacher_nfe=teacher_full_nfe,
                                    title=f"quality against NFE: student {student_version}")
        if extra is not None:
            metrics2d.plot_samples(extra[1], teacher_x0, str(d / plots["samples_multistep"]),
                                   title=f"student {student_version}", student_label=f"student ({extra[0]} NFE)")

    if artifacts.is_local(out_dir):
        draw(artifacts.local_path(out_dir))
    else:
        with tempfile.TemporaryDirectory(prefix="kdm-plots-") as tmp:
            draw(Path(tmp))
            for fname in plots.values():
                artifacts.write_bytes(artifacts.join(out_dir, fname), (Path(tmp) / fname).read_bytes())
    return plots


def read_report(url: str) -> EvaluationReport:
    if not url.endswith(".json"):
        url = artifacts.join(url, REPORT)
    return artifacts.read_model(url, EvaluationReport)


def find_reports(root: str) -> list[tuple[str, EvaluationReport]]:
    """(URL, report) of every committed evaluation under ``<root>/evaluations`` (a local path or an
    fsspec URL), oldest first by creation time."""
    base = artifacts.join(root, "evaluations")
    if not artifacts.exists(base):
        return []
    fs, path = artifacts.url_to_fs(base)
    found = []
    for p in fs.glob(f"{path.rstrip('/')}/*/{REPORT}"):
        if p.rsplit("/", 2)[-2].endswith(".partial"):
            continue
        url = p if artifacts.is_local(base) else fs.unstrip_protocol(p)
        found.append((url, read_report(url)))
    return sorted(found, key=lambda item: item[1].created)


def metrics_table(report: EvaluationReport) -> list[dict]:
    """One row per model: the student at each NFE scored, the teacher's x_0 (the floor), the teacher cut short."""
    def row(name: str, nfe, ms: MetricSet) -> dict:
        return {"model": name, "nfe": nfe, "in_cell": round(ms.in_cell_fraction, 4), "swd": round(ms.swd, 4),
                "outlier_rate": round(ms.outlier_rate, 4),
                "pair_mse": None if ms.pair_mse is None else float(f"{ms.pair_mse:.3g}"),
                "pair_mse_se": None if ms.pair_mse_stderr is None else float(f"{ms.pair_mse_stderr:.2g}"),
                "n": ms.num_points}
    students = [p for p in report.frontier if p.model == "student"] or [FrontierPoint(model="student", nfe=1,
                                                                                      metrics=report.student)]
    rows = [row(f"student ({p.nfe} NFE)", p.nfe, p.metrics) for p in students]
    rows.append(row("teacher x_0", report.teacher_nfe, report.teacher_reference))
    rows += [row(f"teacher, {p.sampler.describe()}" if p.sampler else "teacher", p.nfe, p.metrics)
             for p in report.frontier if p.model == "teacher"]
    return rows


def format_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    cells = [["-" if r[c] is None else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    return "\n".join([line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells])
