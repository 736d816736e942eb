"""The ``distill-cifar10`` flow: CIFAR-10 distillation over two work pools, artifacts in the Prefect UI.

Deployments (prefect.yaml): ``distill-cifar10/distill-cifar10`` (unconditional, preset ``full``),
``distill-cifar10/distill-cifar10-cond`` (class-conditional) on pool ``kdm-cpu``, and
``gpu-stage/gpu-stage`` on pool ``kdm-gpu``.

Parameters: ``config`` (a DistillImageConfig mapping) and, as shortcuts, every top-level field of it
(``preset``, ``conditional``, ``root``, ``teacher_uri``, ``student``, ...): they are merged onto
``config`` and validated once, the named preset filling every field set by neither, so
``--param preset=smoke`` and ``--params '{"preset": "mini", "student": {"train": {"steps": 100}}}'`` work
as well as ``parameters={"config": {"preset": "mini", "teacher_uri": URI}}``. The server checks them
against the schema of the signature's pydantic types; the flow reports a readable error for the rest.

Where stages run: the CPU stages (dataset; the extractor when its device is cpu; the report) run in this
flow, on ``kdm-cpu``. Each GPU stage (teacher, pairs, student, evaluation; the extractor on cuda) is a
run of the deployment ``gpu-stage/gpu-stage`` (flow ``gpu-stage``: the stage name, its typed config and
its input URIs as one StageRequest) on pool ``kdm-gpu``, started with ``run_deployment`` as a subflow and
awaited; give ``kdm-gpu`` a concurrency limit equal to its number of GPUs (with ``gpus=N``: to its number
of N-GPU workers; the pairs and student stages then run their ``kdm`` command in N processes under
torchrun inside the stage, pipeline/training/torchrun.py, and their progress shows in the log). A GPU stage whose output
already exists is not dispatched. When that deployment does not exist on the server (e.g. a plain
``python -c`` call of the flow) the GPU stages run as tasks in this process, on ``config.device``.
Artifacts live under ``root``, which both pools must see (a shared file system or object storage);
stages pass URIs, never tensors.
"""

import base64
from pathlib import Path
from typing import Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import (create_image_artifact, create_link_artifact, create_markdown_artifact,
                               create_progress_artifact, create_table_artifact, update_progress_artifact)
from pydantic import TypeAdapter, ValidationError

from pipeline.storage import artifacts
from pipeline.evaluation import image_metrics
from pipeline import stages_image
from pipeline.errors import KDMError
from storage_schemas import format_validation_error
from storage_schemas.distill_image import (Device, DistillImageConfig, EvaluationStageRequest,
                                           ExtractorStageConfig, ExtractorStageRequest, ImageDatasetStageConfig,
                                           ImageEvalStageConfig, ImagePairsStageConfig, ImageStudentStageConfig,
                                           PairsStageRequest, PresetName, StageRequest, StudentStageRequest,
                                           TeacherStageRequest, config_from_parameters)
from storage_schemas.teacher import EDMTeacherTrainConfig

REPO = Path(__file__).resolve().parent.parent
GPU_DEPLOYMENT = "gpu-stage/gpu-stage"
LINEAGE = ("dataset", "extractor", "teacher", "pairs", "student", "evaluation")


def _slug(text: str) -> str:
    return "-".join(p for p in "".join(c if c.isalnum() else "-" for c in text.lower()).split("-") if p)


def _link(uri: str) -> str:
    return Path(uri).resolve().as_uri() if artifacts.is_local(uri) else uri


def artifact_key(results: dict) -> str:
    """Prefix of this run's artifact keys: stable per dataset and teacher (a re-run updates the same keys)."""
    return _slug(f"cifar10-{results['dataset']['version'].removeprefix('ds-')[:8]}-{results['teacher']['version']}")


# ----------------------------------------------------------------------------- running one stage with progress

def run_with_progress(request) -> dict:
    """Run one stage request, with Prefect progress artifacts for the long ones (teacher, pairs, student)."""
    logger = get_run_logger()
    stage = request.stage
    on_log = on_shard = None
    pid = None
    if stage == "teacher" and not request.config.teacher_uri:
        steps = request.config.bootstrap.steps
        pid = create_progress_artifact(0.0, description=f"EDM teacher bootstrap ({steps} steps)")

        def on_log(rec: dict) -> None:
            update_progress_artifact(pid, 100.0 * rec["step"] / steps)
            logger.info("teacher step %d loss %.4f (%.0f images/s)", rec["step"], rec["loss"], rec["images_per_s"])
    elif stage == "pairs":
        pid = create_progress_artifact(0.0, description="teacher pair generation (shards of the split in progress)")

        def on_shard(i: int, total: int) -> None:
            update_progress_artifact(pid, 100.0 * (i + 1) / max(total, 1))
    elif stage == "student":
        steps = request.config.train.steps
        pid = create_progress_artifact(0.0, description=f"KDM student training ({steps} steps)")

        def on_log(rec: dict) -> None:
            update_progress_artifact(pid, 100.0 * rec["step"] / steps)
            logger.info("student step %d loss %.4f (%.0f pairs/s)", rec["step"], rec.get("loss_total", float("nan")),
                        rec["pairs_per_s"])
    res = stages_image.run_stage_request(request, progress=False, on_log=on_log, on_shard=on_shard)
    if pid is not None:
        update_progress_artifact(pid, 100.0)
    logger.info("%s %s %s", stage, res["version"], "(exists, skipped)" if res["skipped"] else "done")
    return res


@task(name="gpu-stage-in-process")
def gpu_stage_task(request: StageRequest) -> dict:
    return run_with_progress(request)


@flow(name="gpu-stage", log_prints=True)
def gpu_stage(request: StageRequest) -> dict:
    """One GPU stage of the CIFAR-10 distillation (deployment ``gpu-stage/gpu-stage``, pool kdm-gpu)."""
    request = TypeAdapter(StageRequest).validate_python(request)
    return run_with_progress(request)


def _gpu_deployment_exists() -> bool:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(GPU_DEPLOYMENT)
        except ObjectNotFound:
            return False
    return True


def run_gpu_stage(request, use_deployment: bool) -> dict:
    """A GPU stage: skipped when its output exists, else a run of ``gpu-stage/gpu-stage`` (awaited) or a task."""
    logger = get_run_logger()
    uri, done = stages_image.stage_output(request)
    if done:
        return stages_image.run_stage_request(request)
    if not use_deployment:
        logger.info("%s: deployment %s is not registered; running the stage in this process on %s", request.stage,
                    GPU_DEPLOYMENT, request.device)
        return gpu_stage_task.with_options(name=f"{request.stage}-in-process")(request)
    from prefect.deployments import run_deployment
    logger.info("%s: starting %s on pool %s", request.stage, GPU_DEPLOYMENT, stages_image.GPU_POOL)
    run = run_deployment(GPU_DEPLOYMENT, parameters={"request": request.model_dump(mode="json")}, as_subflow=True,
                         timeout=None, flow_run_name=f"{request.stage}-{_slug(Path(uri).name)}")
    state = run.state
    if state is None or not state.is_completed():
        raise KDMError(f"{request.stage} stage (flow run {run.id} of {GPU_DEPLOYMENT}) ended "
                       f"{state.name if state else 'without a state'}: {state.message if state else ''}")
    uri, done = stages_image.stage_output(request)
    if not done:
        raise KDMError(f"{request.stage} stage completed on pool {stages_image.GPU_POOL} but its output {uri} is not "
                       f"visible here: the artifact root must be storage both pools share")
    return {**stages_image.run_stage_request(request), "skipped": False, "flow_run": str(run.id)}


# ----------------------------------------------------------------------------- CPU stages

@task(name="prepare-dataset")
def dataset_task(root: str, cfg: ImageDatasetStageConfig) -> dict:
    return stages_image.stage_dataset(root, cfg)


@task(name="train-extractor")
def extractor_task(root: str, dataset_uri: str, cfg: ExtractorStageConfig) -> dict:
    res = stages_image.stage_extractor(root, dataset_uri, cfg)
    get_run_logger().info("extractor %s test accuracy %s", res["id"], res["test_accuracy"])
    return res


@task(name="publish-artifacts")
def publish_task(config: DistillImageConfig, results: dict) -> str:
    """Markdown report (config, lineage, metrics with protocol, links, grids), metrics table, links, images."""
    key = artifact_key(results)
    ev = results["evaluation"]
    report = image_metrics.read_report(ev["report"])
    rows = [{"metric": m.name, "subject": m.subject, "value": m.value, "std": m.std, "n": m.protocol.num_samples,
             "seeds": m.protocol.seeds.text(), "split": m.protocol.split} for m in report.metrics]
    rows.append({"metric": f"{ev['metric_names']['fd']} ratio", "subject": "student / teacher",
                 "value": ev["fd_ratio"], "std": None, "n": ev["num_samples"], "seeds": rows[0]["seeds"],
                 "split": "train"})
    create_table_artifact(rows, key=f"{key}-metrics",
                          description=f"teacher and student vs the train split, student vs teacher on held-out seeds "
                                      f"({ev['num_samples']} samples)")
    for name in LINEAGE:
        create_link_artifact(_link(results[name]["uri"]), link_text=f"{name}: {results[name]['version']}",
                             key=f"{key}-{name}-link", description=f"{name} artifact")
    images = []
    for name, fname in ev["plots"].items():
        data = artifacts.read_bytes(artifacts.join(ev["uri"], fname))
        uri = "data:image/png;base64," + base64.b64encode(data).decode()
        create_image_artifact(uri, key=f"{key}-{_slug(name)}", description=name.replace("_", " "))
        images.append((name, uri))
    d, fx, t, p, s = (results[k] for k in ("dataset", "extractor", "teacher", "pairs", "student"))
    lineage = [
        f"dataset `{d['version']}` ({d.get('train_images', 0)} train images, content `{d['content_hash'][:16]}`)",
        f"extractor `{fx['id']}` (test accuracy {fx['test_accuracy']}, sha256 `{fx['sha256'][:16]}`)",
        f"teacher `{t['version']}` ({'given' if t['given'] else 'bootstrapped'}, sha256 `{t['sha256'][:16]}`)",
        f"pairs `{p['version']}` ({p['count']} train + {p['heldout_count']} held out, {p['nfe']} NFE, content "
        f"`{p['content_hash'][:16]}`)",
        f"student `{s['version']}` ({s['trainable_parameters']:,} parameters, {s['steps']} steps, "
        f"{s['train_seconds']:.0f} s)",
        f"evaluation `{ev['version']}`"]
    first = report.metrics[0].protocol
    proto = (f"Protocol: n = {ev['num_samples']} teacher / one-step student outputs from the held-out seeds "
             f"{first.seeds.text()} (same noise for both), quantised with EDM's uint8 formula; "
             f"{ev['metric_names']['fd']} and {ev['metric_names']['kid']} against the train split "
             f"(reference `{first.reference.id}`, {first.reference.num_images} images) on the offline extractor "
             f"`{first.feature_extractor.id}` (not FID); KID over {first.kid_subsets} subsets of "
             f"{first.kid_subset_size}; MSE on the float outputs.")
    md = [f"# KDM distillation: CIFAR-10 ({config.preset}{', class-conditional' if config.conditional else ''})", "",
          "## Lineage", "", "\n".join(f"{i + 1}. {line}" for i, line in enumerate(lineage)), "", "## Metrics", "",
          image_metrics.metrics_markdown(report.metrics), "",
          f"FD ratio student / teacher: **{ev['fd_ratio']:.3f}**", "", proto]
    md += [f"\n{k}: {v}" for k, v in ev["notes"].items()]
    md += ["", "## Images", ""] + [f"![{name}]({uri})" for name, uri in images]
    md += ["", "## Artifacts", ""] + [f"- {n}: [{results[n]['uri']}]({_link(results[n]['uri'])})" for n in LINEAGE]
    md += ["", "## Config", "", "```json", config.model_dump_json(indent=2), "```"]
    create_markdown_artifact("\n".join(md), key=f"{key}-report", description="KDM CIFAR-10 distillation report")
    return ev["report"]


# ----------------------------------------------------------------------------- the flow

@flow(name="distill-cifar10", log_prints=True, validate_parameters=False)
def distill_cifar10(config: Optional[DistillImageConfig] = None, preset: Optional[PresetName] = None,
                    conditional: Optional[bool] = None, root: Optional[str] = None, device: Optional[Device] = None,
                    gpus: Optional[int] = None,
                    dataset: Optional[ImageDatasetStageConfig] = None, extractor: Optional[ExtractorStageConfig] = None,
                    teacher_uri: Optional[str] = None, teacher: Optional[EDMTeacherTrainConfig] = None,
                    pairs: Optional[ImagePairsStageConfig] = None, student: Optional[ImageStudentStageConfig] = None,
                    evaluation: Optional[ImageEvalStageConfig] = None) -> dict:
    """Distill a CIFAR-10 EDM teacher (bootstrapped, or ``teacher_uri``) into a one-step KDM student and
    evaluate it. Without parameters: the ``full`` preset (the paper's recipe). Relative paths resolve
    against the repository."""
    try:
        cfg = config_from_parameters(config, preset=preset, conditional=conditional, root=root, device=device,
                                     gpus=gpus,
                                     dataset=dataset, extractor=extractor, teacher_uri=teacher_uri, teacher=teacher,
                                     pairs=pairs, student=student, evaluation=evaluation)
    except ValidationError as e:
        raise KDMError(format_validation_error(e, "distill-cifar10 parameters")) from None
    except ValueError as e:
        raise KDMError(f"distill-cifar10 parameters: {e}") from None
    cfg = stages_image.resolve_paths(cfg, REPO)
    logger = get_run_logger()
    use_deployment = _gpu_deployment_exists()
    r, dev = {}, cfg.device
    r["dataset"] = dataset_task(cfg.root, cfg.dataset)
    ds = r["dataset"]["uri"]
    if cfg.extractor.device == "cuda":
        r["extractor"] = run_gpu_stage(ExtractorStageRequest(root=cfg.root, device="cuda", dataset_uri=ds,
                                                             config=cfg.extractor), use_deployment)
    else:
        r["extractor"] = extractor_task(cfg.root, ds, cfg.extractor)
    r["teacher"] = run_gpu_stage(TeacherStageRequest(root=cfg.root, device=dev, dataset_uri=ds,
                                                     config=cfg.teacher_stage()), use_deployment)
    r["pairs"] = run_gpu_stage(PairsStageRequest(root=cfg.root, device=dev, gpus=cfg.gpus,
                                                 teacher_uri=r["teacher"]["uri"], config=cfg.pairs), use_deployment)
    r["student"] = run_gpu_stage(StudentStageRequest(root=cfg.root, device=dev, gpus=cfg.gpus,
                                                     pairs_uri=r["pairs"]["uri"], config=cfg.student), use_deployment)
    r["evaluation"] = run_gpu_stage(EvaluationStageRequest(
        root=cfg.root, device=dev, dataset_uri=ds, extractor_uri=r["extractor"]["uri"], pairs_uri=r["pairs"]["uri"],
        student_uri=r["student"]["uri"], config=cfg.evaluation), use_deployment)
    publish_task(cfg, r)
    ev = r["evaluation"]
    logger.info("FD ratio student / teacher %.3f (%s teacher %.4g, student %.4g), MSE %.4g; report %s",
                ev["fd_ratio"], ev["metric_names"]["fd"], ev["fd_teacher"], ev["fd_student"], ev["mse"], ev["report"])
    return r
