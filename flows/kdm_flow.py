"""The ``kdm`` flow: one typed config, one task per stage, artifacts in the Prefect UI.

Deployment ``kdm/distill-checkerboard`` (prefect.yaml) runs it with the ``checkerboard`` preset. Each
task calls a plain-Python stage of ``pipeline.stages`` with URIs + a typed config and returns a small
dict; finished stages are skipped because their content-addressed output already exists. The artifact
root (``config.root``) may be a local path or an ``s3://bucket/prefix`` URL.

The annotations are evaluated (no ``from __future__ import annotations``): a runner that pickles the
flow into a spawned process (``kdm.serve()``) must still resolve ``DistillCheckerboardConfig``.
"""
import base64
from pathlib import Path
from prefect import flow, get_run_logger, task
from prefect.artifacts import (create_image_artifact, create_link_artifact, create_markdown_artifact,
                               create_progress_artifact, create_table_artifact, update_progress_artifact)

from pipeline.storage import artifacts
from pipeline.evaluation import evaluate2d as evaluate
from pipeline import stages
from storage_schemas import (CheckerboardSpec, DistillCheckerboardConfig, Eval2DConfig, FilterConfig,
                             PairsGenerateConfig, PairsImportConfig, StudentRunConfig, TeacherTrainConfig)

REPO = Path(__file__).resolve().parent.parent


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def _link(uri: str) -> str:
    return Path(uri).resolve().as_uri() if artifacts.is_local(uri) else uri


@task(name="train-teacher")
def teacher_task(root: str, cfg: TeacherTrainConfig) -> dict:
    res = stages.stage_teacher(root, cfg, progress=False)
    get_run_logger().info("teacher %s %s", res["version"], "(exists, skipped)" if res["skipped"] else "trained")
    return res


@task(name="generate-pairs")
def generate_task(root: str, teacher_uri: str, cfg: PairsGenerateConfig) -> dict:
    pid = create_progress_artifact(0.0, description="teacher pair generation (shards done)")

    def on_shard(i: int, total: int) -> None:
        update_progress_artifact(pid, 100.0 * (i + 1) / max(total, 1))

    res = stages.stage_generate(root, teacher_uri, cfg, progress=False, on_shard=on_shard)
    update_progress_artifact(pid, 100.0)
    return res


@task(name="import-pairs")
def import_task(root: str, src: str, cfg: PairsImportConfig) -> dict:
    return stages.stage_import(root, src, cfg)


@task(name="filter-pairs")
def filter_task(root: str, pairs_uri: str, cfg: FilterConfig) -> dict:
    res = stages.stage_filter(root, pairs_uri, cfg)
    get_run_logger().info("filter kept %s of the pairs: %s", res["counts"]["kept"], res["counts"])
    return res


@task(name="train-student")
def train_task(root: str, pairs_uri: str, cfg: StudentRunConfig) -> dict:
    pid = create_progress_artifact(0.0, description=f"KDM student training ({cfg.train.steps} steps)")
    logger = get_run_logger()
    every = max(cfg.train.steps // 20, cfg.train.log_every)

    def on_log(rec: dict) -> None:
        if rec["step"] % every == 0 or rec["step"] == cfg.train.steps:
            update_progress_artifact(pid, 100.0 * rec["step"] / cfg.train.steps)
            logger.info("step %d loss %.4f (%.0f pairs/s)", rec["step"], rec["loss_total"], rec["pairs_per_s"])

    res = stages.stage_train(root, pairs_uri, cfg, progress=False, on_log=on_log)
    update_progress_artifact(pid, 100.0)
    if res["skipped"]:
        logger.info("student %s (exists, skipped)", res["version"])
    elif res["resumed_from_step"] is not None:
        logger.info("student %s resumed from its step-%d checkpoint", res["version"], res["resumed_from_step"])
    return res


@task(name="evaluate")
def evaluate_task(root: str, student_uri: str, pairs_uri: str, cfg: Eval2DConfig, board: CheckerboardSpec) -> dict:
    return stages.stage_evaluate(root, student_uri, pairs_uri, cfg, board)


@task(name="publish-artifacts")
def publish_task(config: DistillCheckerboardConfig, results: dict) -> str:
    """Markdown report (config, lineage, metrics, plots), metrics table, links and images."""
    key = _slug(config.preset if "checkerboard" in config.preset else f"checkerboard-{config.preset}")
    ev = results["evaluation"]
    report = evaluate.read_report(ev["uri"])
    rows = evaluate.metrics_table(report)
    create_table_artifact(rows, key=f"{key}-metrics",
                          description=f"student vs teacher metrics (protocol: n={report.student.num_points}, "
                                      f"SWD {report.protocol.swd_projections} projections)")
    for name in ("teacher", "pairs", "filtered", "student", "evaluation"):
        if name in results:
            create_link_artifact(_link(results[name]["uri"]), link_text=f"{name}: {results[name]['version']}",
                                 key=f"{key}-{name}-link", description=f"{name} artifact")
    images = []
    for name, fname in report.plots.items():
        png = artifacts.read_bytes(artifacts.join(ev["uri"], fname))
        uri = "data:image/png;base64," + base64.b64encode(png).decode()
        create_image_artifact(uri, key=f"{key}-{_slug(name)}", description=name.replace("_", " "))
        images.append((name, uri))
    lineage = []
    if "teacher" in results:
        lineage.append(f"teacher `{results['teacher']['version']}` (sha256 `{results['teacher']['sha256'][:16]}`)")
    lineage.append(f"pairs `{results['pairs']['version']}` ({results['pairs']['count']} train + "
                   f"{results['pairs']['heldout_count']} held out, content `{results['pairs']['content_hash'][:16]}`)")
    counts = results["filtered"]["counts"]
    lineage.append(f"filtered `{results['filtered']['version']}` (kept {counts['kept']}; dropped "
                   + ", ".join(f"{k} {v}" for k, v in counts.items() if k != "kept") + ")")
    st = results["student"]
    lineage.append(f"student `{st['version']}` ({st['trainable_parameters']:,} parameters, {st['steps']} steps, "
                   f"{st['train_seconds']:.0f} s)")
    lineage.append(f"evaluation `{ev['version']}`")
    md = [f"# KDM distillation: checkerboard ({config.preset})", "", "## Lineage", "",
          " ->\n".join(f"{i + 1}. {line}" for i, line in enumerate(lineage)), "", "## Metrics", "",
          evaluate.format_table(rows), "",
          f"Protocol: n = {report.student.num_points} points per row; reference = first n held-out teacher x_0; "
          f"student = one-step samples from seeds {report.sample_seeds.text()}; teacher = first n train-split x_0; "
          f"SWD-1 with {report.protocol.swd_projections} projections (seed {report.protocol.swd_seed}); outliers = "
          f"DBSCAN(eps {report.protocol.dbscan_eps}, min_samples {report.protocol.dbscan_min_samples}) "
          f"united with |z| > {report.protocol.zscore_threshold}.", "", "## Plots", ""]
    md += [f"![{name}]({uri})" for name, uri in images]
    md += ["", "## Artifacts", ""] + [f"- {n}: [{results[n]['uri']}]({_link(results[n]['uri'])})"
                                       for n in ("teacher", "pairs", "filtered", "student", "evaluation") if n in results]
    md += ["", "## Config", "", "```json", config.model_dump_json(indent=2), "```"]
    create_markdown_artifact("\n".join(md), key=f"{key}-report", description="KDM distillation report")
    return ev["report"]


@flow(name="kdm", log_prints=True)
def kdm(config: DistillCheckerboardConfig = DistillCheckerboardConfig()) -> dict:
    """Distill a checkerboard teacher into a one-step KDM student and evaluate it.

    The default config is the CPU-sized ``checkerboard`` preset; relative paths resolve against the
    repository."""
    config = stages.resolve_paths(config, REPO)
    root = config.root
    results: dict = {}
    if config.source == "teacher":
        results["teacher"] = teacher_task(root, config.teacher)
        results["pairs"] = generate_task(root, results["teacher"]["uri"], config.pairs)
    else:
        results["pairs"] = import_task(root, config.import_uri, config.import_config)
    results["filtered"] = filter_task(root, results["pairs"]["uri"], config.filter)
    results["student"] = train_task(root, results["filtered"]["uri"], config.student)
    results["evaluation"] = evaluate_task(root, results["student"]["uri"], results["filtered"]["uri"],
                                          config.evaluation, config.teacher.data)
    publish_task(config, results)
    print(evaluate.format_table(results["evaluation"]["table"]))
    return {k: {kk: vv for kk, vv in v.items() if kk != "table"} for k, v in results.items()}
