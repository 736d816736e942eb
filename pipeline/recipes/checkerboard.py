"""The ``checkerboard`` recipe (paper Sec. 4, 6.1, App. E.6): flow-matching teacher (or the official
trajectories, imported) -> pairs -> filter -> student -> evaluation -> report, CPU-sized.

What is particular to 2-D points lives here: the flow-matching teacher, the k-d-tree filter, the 2-D
student loop and the 2-D metrics (in-cell fraction, sliced Wasserstein-1, outliers, held-out pair MSE).
"""
from __future__ import annotations

from pipeline.recipes.common import PairsStage, PairStoreStage
from pipeline.stages import Stage, StageContext
from pipeline.errors import KDMError
from pipeline.storage import artifacts
from storage_schemas import recipe_version, stable_hash


class FlowMatchingTeacher(Stage):
    """The flow-matching velocity MLP (conditional OT path) trained on the board, ``<root>/teachers/<id>``."""

    name, kind, inputs = "teacher", "teachers", ()

    def output(self, cfg, uris):
        from pipeline.teachers.flow_matching import teacher_version
        return artifacts.join(cfg.root, "teachers", teacher_version(cfg.teacher))

    def run(self, cfg, uris, out, ctx: StageContext):
        from pipeline.teachers.flow_matching import train_teacher
        train_teacher(cfg.teacher, out, progress=ctx.progress_bars)
        return {}

    def summary(self, cfg, uris, out):
        from pipeline.storage.manifests import read_teacher_manifest
        m = read_teacher_manifest(out)
        return {"uri": out, "version": m.id, "sha256": m.weights_sha256, "final_loss": m.final_loss}

    def lineage(self, s):
        return f"teacher `{s['version']}` (sha256 `{s['sha256'][:16]}`)"


class ImportedPairs(PairStoreStage):
    """Pairs imported from an external file (the official KDM trajectories), ``<root>/pairs/<version>``."""

    name, inputs, lineage_name = "pairs", (), "pairs (imported)"

    def output(self, cfg, uris):
        from pipeline.pairs.importer import import_version
        if not artifacts.exists(cfg.import_uri):
            raise KDMError(f"import_uri {cfg.import_uri} does not exist: put the file there (the checkerboard-import "
                           f"preset reads the official KDM trajectories checkerboard-fm-trajectories.npy from "
                           f"$KDM_DATA_DIR, default ~/.cache/kdm/data) or set import_uri to its path")
        return artifacts.join(cfg.root, "pairs", import_version(cfg.import_uri, cfg.import_config))

    def run(self, cfg, uris, out, ctx):
        from pipeline.pairs.importer import import_pairs
        import_pairs(cfg.import_uri, cfg.import_config, out)
        return {}


class Filter2D(PairStoreStage):
    """Privacy filter + dedup of 2-D pairs: non-finite, duplicate seeds, blocklisted and near-duplicate x_0
    (k-d tree); a new pair-store version with a count per reason."""

    name, inputs, lineage_name = "filter", ("pairs",), "filtered"

    def output(self, cfg, uris):
        from pipeline.pairs.filter import filter_version
        from pipeline.storage.pairstore import PairStore
        block_sha = artifacts.sha256_file(cfg.filter.blocklist_uri) if cfg.filter.blocklist_uri else None
        return artifacts.join(cfg.root, "pairs",
                              filter_version(PairStore.open(uris["pairs"]).version, cfg.filter, block_sha))

    def run(self, cfg, uris, out, ctx):
        from pipeline.pairs.filter import filter_pairs
        filter_pairs(uris["pairs"], cfg.filter, out)
        return {}


class Student2D(Stage):
    """The 2-D KDM student (MLP encoders/decoder, Koopman operator), EMA, resumable checkpoints."""

    name, kind, inputs = "student", "students", ("filter",)
    progress_label = "KDM student training"

    def output(self, cfg, uris):
        from pipeline.storage.pairstore import PairStore
        from pipeline.training.train2d import run_version
        return artifacts.join(cfg.root, "students", run_version(PairStore.open(uris["filter"]).version, cfg.student))

    def run(self, cfg, uris, out, ctx: StageContext):
        from pipeline.training.train2d import train_student
        steps = cfg.student.train.steps
        every = max(steps // 20, cfg.student.train.log_every)
        resumed: list[int] = []

        def on_log(rec: dict) -> None:
            if rec["step"] % every == 0 or rec["step"] == steps:
                ctx.progress(rec["step"] / steps, f"step {rec['step']} loss {rec['loss_total']:.4f} "
                                                  f"({rec['pairs_per_s']:.0f} pairs/s)")

        train_student(uris["filter"], cfg.student, out, progress=ctx.progress_bars, on_log=on_log,
                      on_resume=resumed.append)
        if resumed:
            ctx.log(f"student {self.version(out)} resumed from its step-{resumed[0]} checkpoint")
        return {"resumed_from_step": resumed[0] if resumed else None}

    def summary(self, cfg, uris, out):
        from pipeline.storage.manifests import read_student_manifest
        m = read_student_manifest(out)
        return {"uri": out, "version": m.version, "weights_sha256": m.weights_sha256, "steps": m.steps_done,
                "final_losses": m.final_losses, "train_seconds": m.train_seconds,
                "trainable_parameters": m.trainable_parameters, "resumed_from_step": None}

    def lineage(self, s):
        return (f"student `{s['version']}` ({s['trainable_parameters']:,} parameters, {s['steps']} steps, "
                f"{s['train_seconds']:.0f} s)")


class Evaluation2D(Stage):
    """In-cell fraction, sliced Wasserstein-1, outlier rate and held-out pair MSE of student and teacher,
    with plots, ``<root>/evaluations/<version>/report.json``; the student at every NFE it was trained for and,
    with ``evaluation.teacher_nfe``, the teacher's sampler cut short (the quality-vs-NFE frontier)."""

    name, kind = "evaluation", "evaluations"

    def __init__(self, with_teacher: bool = False):
        self.inputs = ("student", "filter") + (("teacher",) if with_teacher else ())

    def output(self, cfg, uris):
        from pipeline.storage.pairstore import PairStore
        from pipeline.storage.manifests import read_student_manifest
        parts = [recipe_version(), "evaluate", read_student_manifest(uris["student"]).version,
                 PairStore.open(uris["filter"]).version, cfg.evaluation_config, cfg.teacher.data]
        if "teacher" in self.inputs:          # the teacher network is an input only when its sampler is cut short
            from pipeline.storage.manifests import read_teacher_manifest
            parts.append(read_teacher_manifest(uris["teacher"]).id)
        return artifacts.join(cfg.root, "evaluations", "eval-" + stable_hash(*parts))

    def done(self, out):
        from pipeline.evaluation.evaluate2d import REPORT
        return artifacts.exists(artifacts.join(out, REPORT))

    def run(self, cfg, uris, out, ctx):
        from pipeline.evaluation.evaluate2d import REPORT, evaluate_student
        tmp = artifacts.begin(out, fresh=True)
        evaluate_student(uris["student"], uris["filter"], cfg.evaluation_config, tmp, board=cfg.teacher.data,
                         teacher=uris.get("teacher"))
        artifacts.commit(out, markers=(REPORT,))
        return {}

    def summary(self, cfg, uris, out):
        from pipeline.evaluation import evaluate2d
        report = evaluate2d.read_report(out)
        return {"uri": out, "version": self.version(out), "report": artifacts.join(out, evaluate2d.REPORT),
                "table": evaluate2d.metrics_table(report), "plots": dict(report.plots)}


def report_parts(cfg, results: dict) -> dict:
    """The recipe-specific parts of the run report: title, metric rows, protocol, headline."""
    from pipeline.evaluation import evaluate2d
    ev = results["evaluation"]
    report = evaluate2d.read_report(ev["uri"])
    rows = evaluate2d.metrics_table(report)
    protocol = (f"Protocol: n = {report.student.num_points} points per row; reference = first n held-out teacher "
                f"x_0; student = samples from seeds {report.sample_seeds.text()} (at each NFE); teacher x_0 = first n "
                f"train-split x_0; teacher cut short (if any) = its ODE solver from the student's seeds, pair MSE "
                f"against the full teacher; pair_mse_se = the pair MSE's standard error over the n held-out pairs; SWD-1 with {report.protocol.swd_projections} projections (seed "
                f"{report.protocol.swd_seed}); outliers = DBSCAN(eps {report.protocol.dbscan_eps}, min_samples "
                f"{report.protocol.dbscan_min_samples}) united with |z| > {report.protocol.zscore_threshold}.")
    preset = cfg.preset if "checkerboard" in cfg.preset else f"checkerboard-{cfg.preset}"
    return {"title": f"KDM distillation: checkerboard ({cfg.preset})", "key": preset, "metrics": rows,
            "metrics_description": f"student vs teacher metrics (protocol: n={report.student.num_points}, "
                                   f"SWD {report.protocol.swd_projections} projections)",
            "headline": "", "protocol": protocol, "table_text": evaluate2d.format_table(rows), "notes": []}


def stages(cfg) -> list[Stage]:
    first = [FlowMatchingTeacher(), PairsStage()] if cfg.source == "teacher" else [ImportedPairs()]
    return first + [Filter2D(), Student2D(), Evaluation2D(with_teacher=bool(cfg.evaluation_config.teacher_nfe))]
