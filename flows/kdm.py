"""The ``kdm`` flow: one flow for every recipe, stages over two work pools, artifacts in the Prefect UI.

Deployments (prefect.yaml): ``kdm/distill-cifar10`` (recipe cifar10, unconditional, preset ``full``),
``kdm/distill-cifar10-cond`` (class-conditional), ``kdm/distill-checkerboard`` (recipe checkerboard, the
CPU-sized demo) on pool ``kdm-cpu``, and ``gpu-stage/gpu-stage`` on pool ``kdm-gpu``.

Parameters: ``recipe``, ``config`` (a mapping of the recipe's config) and, as shortcuts, the top-level
fields (``preset``, ``conditional``, ``root``, ``gpus``, ``teacher_uri``, ``student``, ...): merged onto
``config`` (a shortcut wins) and deep-merged onto the named preset, so ``--param preset=mini`` and
``--params '{"preset": "mini", "student": {"train": {"steps": 100}}}'`` change only what they name. The
server checks them against the signature's pydantic types; the flow reports the rest with the field's path.

Where stages run: the flow walks the recipe's stage list (``pipeline.recipes``) through the one skeleton
(``pipeline.stages.run_stage``). A CPU stage runs here as a task on ``kdm-cpu``; a GPU stage is a run of
``gpu-stage/gpu-stage`` on ``kdm-gpu`` (started with ``run_deployment`` as a subflow and awaited; give that
pool a concurrency limit equal to its GPUs, or with ``gpus=N`` to its N-GPU workers). A stage whose
output exists is neither run nor dispatched. Without a registered ``gpu-stage`` deployment (the flow
called from Python) GPU stages run as tasks here. Both pools must see the artifact ``root``. Tasks and
stage runs pass URIs and configs, never arrays. One publisher makes the report of every recipe.

Data (pipeline.data.sources): the cifar10 recipe's dataset is found in ``$KDM_DATA_DIR`` of the worker or
downloaded into it before any stage; absent and offline, the run fails with one line naming the file, its
checksum, its URL and the path to put it at.

Access (pipeline.access): before any stage, every location of the config must lie under the worker's
allowed roots (``KDM_ALLOWED_ROOTS``), and a run created by the ``kdm.teacher.registered`` trigger
distills only a teacher the registry under the deployment's own root holds with that URI and sha256.
"""

import base64
from pathlib import Path
from typing import Literal, Optional, Union

from prefect import flow, get_run_logger, task
from prefect.artifacts import (create_image_artifact, create_link_artifact, create_markdown_artifact,
                               create_progress_artifact, create_table_artifact, update_progress_artifact)
from prefect.states import Failed

from pipeline import access, recipes, stages
from pipeline.data import sources
from pipeline.errors import KDMError
from pipeline.storage import artifacts
from storage_schemas import (DistillCheckerboardConfig, Eval2DConfig, FilterConfig, PairsGenerateConfig,
                             PairsImportConfig, StudentRunConfig, TeacherTrainConfig)
from storage_schemas.distill_image import (Device, DistillImageConfig, ExtractorStageConfig, ImageDatasetStageConfig,
                                           ImageEvalStageConfig, ImagePairsStageConfig, ImageStudentStageConfig)
from storage_schemas.filter_images import ImageFilterConfig
from storage_schemas.perceptual import PerceptualStageConfig
from storage_schemas.recipes import PresetName, RecipeName, StageRequest
from storage_schemas.teacher import EDMTeacherTrainConfig

REPO = Path(__file__).resolve().parent.parent
GPU_DEPLOYMENT = "gpu-stage/gpu-stage"


class _Progress:
    """One Prefect progress artifact per long stage (teacher, pairs, student), updated as it reports."""

    def __init__(self, stage: stages.Stage):
        self.pid = create_progress_artifact(0.0, description=stage.progress_label) if stage.progress_label else None
        self.logger = get_run_logger()
        self.last = -1.0

    def __call__(self, name: str, fraction: float, message: str) -> None:
        if self.pid is not None and (fraction >= 1.0 or fraction - self.last >= 0.05):
            update_progress_artifact(self.pid, 100.0 * fraction)
            self.last = fraction
            if message and fraction < 1.0:
                self.logger.info("%s %s", name, message)


def run_in_process(stage: stages.Stage, cfg, uris: dict) -> dict:
    """Run one stage here (a task of the flow, or the gpu-stage flow), with progress artifacts."""
    logger = get_run_logger()
    ctx = stages.StageContext(progress_bars=False, on_progress=_Progress(stage), log=logger.info)
    res = stages.run_stage(stage, cfg, uris, ctx)
    logger.info("%s %s %s", stage.name, res["version"], "(exists, skipped)" if res["skipped"] else "done")
    return res


@task(name="stage")
def stage_task(request: StageRequest) -> dict:
    return run_in_process(recipes.stage_named(request.config, request.stage), request.config, request.inputs)


@flow(name="gpu-stage", log_prints=True)
def gpu_stage(request: StageRequest) -> dict:
    """One GPU stage of a ``kdm`` run (deployment ``gpu-stage/gpu-stage``, pool kdm-gpu). It can be started
    directly, so it checks its locations against this worker's allowed roots (KDM_ALLOWED_ROOTS) first."""
    access.check_locations_allowed(request)
    return run_in_process(recipes.stage_named(request.config, request.stage), request.config, request.inputs)


def _gpu_deployment_exists() -> bool:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(GPU_DEPLOYMENT)
        except ObjectNotFound:
            return False
    return True


def _dispatch(stage: stages.Stage, cfg, uris: dict, out: str) -> None:
    """Run a GPU stage as a run of ``gpu-stage/gpu-stage`` on pool kdm-gpu and wait for it."""
    from prefect.deployments import run_deployment
    logger = get_run_logger()
    logger.info("%s: starting %s on pool %s", stage.name, GPU_DEPLOYMENT, stages.GPU_POOL)
    request = StageRequest(config=cfg, stage=stage.name, inputs=uris)
    run = run_deployment(GPU_DEPLOYMENT, parameters={"request": request.model_dump(mode="json")}, as_subflow=True,
                         timeout=None, flow_run_name=f"{stage.name}-{stage.version(out)}")
    state = run.state
    if state is None or not state.is_completed():
        raise KDMError(f"{stage.name} stage (flow run {run.id} of {GPU_DEPLOYMENT}) ended "
                       f"{state.name if state else 'without a state'}: {state.message if state else ''}")


@task(name="publish-artifacts")
def publish_task(cfg, results: dict) -> str:
    """The run report of any recipe: markdown (config, lineage, metrics with protocol, images, links), the
    metrics table, one link per artifact and the images."""
    report = recipes.build_report(cfg, results)
    key = report.key
    create_table_artifact(report.metrics, key=f"{key}-metrics", description=report.metrics_description)
    for name, uri in report.links.items():
        create_link_artifact(recipes.link(uri), link_text=f"{name}: {results[name]['version']}",
                             key=f"{key}-{name}-link",
                             description=f"{name} artifact")
    images = {}
    for name, uri in report.images.items():
        data = "data:image/png;base64," + base64.b64encode(artifacts.read_bytes(uri)).decode()
        create_image_artifact(data, key=f"{key}-{recipes.slug(name)}", description=name.replace("_", " "))
        images[name] = data
    create_markdown_artifact(recipes.report_markdown(cfg, report, images), key=f"{key}-report",
                             description=f"KDM distillation report ({cfg.recipe})")
    return report.metrics_markdown


@flow(name="kdm", log_prints=True, validate_parameters=False)
def kdm(recipe: Optional[RecipeName] = None,
        config: Optional[Union[DistillImageConfig, DistillCheckerboardConfig]] = None,
        preset: Optional[PresetName] = None, conditional: Optional[bool] = None, root: Optional[str] = None,
        device: Optional[Device] = None, gpus: Optional[int] = None,
        dataset: Optional[ImageDatasetStageConfig] = None, extractor: Optional[ExtractorStageConfig] = None,
        perceptual: Optional[PerceptualStageConfig] = None, teacher_uri: Optional[str] = None,
        teacher: Optional[Union[EDMTeacherTrainConfig, TeacherTrainConfig]] = None,
        source: Optional[Literal["teacher", "import"]] = None, import_uri: Optional[str] = None,
        import_config: Optional[PairsImportConfig] = None,
        pairs: Optional[Union[ImagePairsStageConfig, PairsGenerateConfig]] = None,
        filter: Optional[Union[ImageFilterConfig, FilterConfig]] = None,
        student: Optional[Union[ImageStudentStageConfig, StudentRunConfig]] = None,
        evaluation: Optional[Union[ImageEvalStageConfig, Eval2DConfig]] = None) -> dict:
    """Distill a teacher into a one-step KDM student with the stages of ``recipe`` (cifar10 | checkerboard;
    default checkerboard) and publish the report. Relative paths resolve against the repository."""
    cfg = recipes.build_config(config, recipe=recipe, preset=preset, conditional=conditional, root=root,
                               device=device, gpus=gpus, dataset=dataset, extractor=extractor,
                               perceptual=perceptual, teacher_uri=teacher_uri, teacher=teacher, source=source, import_uri=import_uri,
                               import_config=import_config, pairs=pairs, filter=filter, student=student,
                               evaluation=evaluation)
    cfg = stages.resolve_paths(cfg, REPO)
    logger = get_run_logger()
    # Before any work: every location under this worker's allowed roots; a run started by the
    # kdm.teacher.registered trigger distills only a teacher registered under the deployment's own root.
    access.guard_run(cfg, default_root=type(cfg).model_fields["root"].default, resolve=lambda r: stages.resolve_local(r, REPO),
                     log=logger.error)
    # The named dataset (cifar10): found in the worker's $KDM_DATA_DIR or downloaded into it, before any
    # stage; absent and offline, the run fails with the one line that says where to put the file.
    try:
        sources.ensure_dataset(cfg, progress=False, log=logger.info)
    except KDMError as e:
        logger.error("refused before any stage: %s", e)
        return Failed(message=str(e), data=e)
    dispatch = _dispatch if cfg.recipe == "cifar10" and _gpu_deployment_exists() else None
    results: dict = {}
    uris: dict = {}
    for stage in recipes.stages_of(cfg):
        ins = {k: uris[k] for k in stage.inputs}
        if dispatch is not None and stage.pool(cfg) == stages.GPU_POOL:
            res = stages.run_stage(stage, cfg, ins, dispatch=dispatch)
            if res["skipped"]:
                logger.info("%s %s (exists, skipped)", stage.name, res["version"])
        else:
            if stage.pool(cfg) == stages.GPU_POOL:
                logger.info("%s: deployment %s is not registered; running the stage in this process on %s",
                            stage.name, GPU_DEPLOYMENT, stage.device(cfg))
            res = stage_task.with_options(name=stage.name)(StageRequest(config=cfg, stage=stage.name, inputs=ins))
        results[stage.name], uris[stage.name] = res, res["uri"]
    print(publish_task(cfg, results))
    return {k: {kk: vv for kk, vv in v.items() if kk != "table"} for k, v in results.items()}
