"""Evaluation of a 2-D student against its teacher's pairs (paper Sec. 6.1, App. E.6).

Protocol (storage_schemas.Eval2DConfig, recorded in every report): n = min(num_samples, held-out,
train) points per row. Reference R = the first n held-out x_0. Student row: n one-step samples from
fresh seeds. Teacher row: the first n x_0 of the train split, i.e. teacher samples independent of R.
Both rows: in-cell fraction, SWD to R, outlier rate. Pair MSE: student(x_T) vs teacher x_0 on the n
held-out pairs.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from storage_schemas import Eval2DConfig, EvaluationReport, MetricSet, SeedRange, code_version, utc_now

from pipeline.storage import artifacts
from pipeline.errors import KDMError
from pipeline.storage.manifests import read_student_manifest

REPORT = "report.json"


def _metric_set(points: np.ndarray, reference: np.ndarray, cfg: Eval2DConfig, board, pair_mse=None) -> MetricSet:
    from pipeline.evaluation import metrics2d
    m = metrics2d.checkerboard_metrics(points, reference, swd_projections=cfg.swd_projections, swd_seed=cfg.swd_seed,
                                       eps=cfg.dbscan_eps, min_samples=cfg.dbscan_min_samples,
                                       z=cfg.zscore_threshold, low=board.low, high=board.high, scale=board.scale)
    return MetricSet(in_cell_fraction=m["in_cell_fraction"], swd=m["swd"], outlier_rate=m["outlier_rate"],
                     pair_mse=pair_mse, num_points=m["num_points"])


def evaluate_student(run: str, pairs_url: str, cfg: Eval2DConfig, out_dir: str,
                     board=None) -> EvaluationReport:
    """Writes the plots, then ``report.json``, into ``out_dir`` (a local directory or a remote URL);
    returns the report. The inputs are checked and read (every chunk verified) before torch is imported."""
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
    n = min(cfg.num_samples, len(held), len(store))
    if n < 20:
        raise KDMError(f"{pairs_url} has {len(store)} train and {len(held)} held-out pairs; at least 20 of each "
                       f"are needed")
    hd = {k: held.read(k, 0, n) for k in ("x_T", "x_0")}
    reference, teacher_x0 = hd["x_0"], store.read("x_0", 0, n)
    from pipeline.evaluation import metrics2d
    from pipeline.evaluation.sample import generate, load_student, noise_for_seeds
    model, student = load_student(run)
    seeds = SeedRange(start=cfg.sample_seed, stop=cfg.sample_seed + n)
    fresh = generate(model, noise_for_seeds(range(seeds.start, seeds.stop), student.model.dim,
                                            store.manifest.x_T_scale))
    paired = generate(model, hd["x_T"])
    student_ms = _metric_set(fresh, reference, cfg, board, pair_mse=metrics2d.pair_mse(paired, hd["x_0"]))
    teacher_ms = _metric_set(teacher_x0, reference, cfg, board, pair_mse=0.0)
    plots: dict[str, str] = {}
    if cfg.plots:
        plots = _write_plots(out_dir, fresh, teacher_x0, hd["x_T"], paired, hd["x_0"], student.version)
    report = EvaluationReport(student_version=student.version, pairs_version=store.version,
                              heldout_version=held.version, teacher_id=student.teacher_id,
                              protocol=cfg, sample_seeds=seeds, student=student_ms,
                              teacher_reference=teacher_ms, plots=plots, code_version=code_version(),
                              created=utc_now())
    artifacts.write_json(artifacts.join(out_dir, REPORT), report)
    return report


def _write_plots(out_dir: str, fresh, teacher_x0, x_T, paired, x_0, student_version: str) -> dict[str, str]:
    """The report's PNGs, drawn into ``out_dir`` (local) or drawn locally and uploaded (remote URL)."""
    plots = {"samples": "samples.png", "noise_structure_student": "noise_structure_student.png",
             "noise_structure_teacher": "noise_structure_teacher.png"}

    from pipeline.evaluation import metrics2d

    def draw(d: Path) -> None:
        metrics2d.plot_samples(fresh, teacher_x0, str(d / plots["samples"]), title=f"student {student_version}")
        metrics2d.plot_noise_structure(x_T, paired, str(d / plots["noise_structure_student"]),
                                       title="student: x_T coloured by the cell of student(x_T)")
        metrics2d.plot_noise_structure(x_T, x_0, str(d / plots["noise_structure_teacher"]),
                                       title="teacher: x_T coloured by the cell of teacher x_0")

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
    rows = []
    for name, ms in (("student (1 NFE)", report.student), ("teacher x_0", report.teacher_reference)):
        rows.append({"model": name, "in_cell": round(ms.in_cell_fraction, 4), "swd": round(ms.swd, 4),
                     "outlier_rate": round(ms.outlier_rate, 4),
                     "pair_mse": None if ms.pair_mse is None else float(f"{ms.pair_mse:.3g}"),
                     "n": ms.num_points})
    return rows


def format_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    cells = [[str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    return "\n".join([line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells])
