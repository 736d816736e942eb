"""The ``redistill`` flow: start one distillation per registered teacher that has no finished student.

Deployment ``redistill/redistill`` (prefect.yaml) runs it on a schedule. Each tick lists the registry
(pipeline.teachers.registry), plans the distillation each CIFAR-10-shaped teacher would get under ``preset`` and
the current recipe version, and for every teacher with a missing stage starts the distillation
deployment with ``run_deployment(..., timeout=0, idempotency_key=f"{teacher_id}-{recipe_version}-{preset}")``.
Prefect returns the existing flow run for a key it has seen, so later ticks start nothing new while a
distillation is queued, running, or after it ran. A teacher with a run of the deployment in flight for
its teacher URI under another key (e.g. one started by the ``kdm.teacher.registered`` trigger) is left
alone. What a tick did is published as a table artifact (key ``redistill``).

Conditional teachers go to ``conditional_deployment`` (unconditional ones to ``deployment``); with
``conditional_deployment=None`` every teacher goes to ``deployment``. The distillation config is the
deployment's parameters (its ``config`` with the top-level ones merged on, as the distillation flow reads
them) with ``preset``, ``root``, ``teacher_uri`` and ``conditional`` set; the run gets it as ``config``
and, where the deployment sets top-level parameters, those too (agreeing with it).
"""

import importlib
from pathlib import Path
from typing import Any, Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowRunFilter,
                                            FlowRunFilterIdempotencyKey, FlowRunFilterState,
                                            FlowRunFilterStateType)
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound

from pipeline import access
from pipeline.storage import artifacts
from pipeline.teachers import registry
from storage_schemas import recipe_version
from storage_schemas.common import deep_merge

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DEPLOYMENT = "kdm/distill-cifar10"
DEFAULT_CONDITIONAL_DEPLOYMENT = "kdm/distill-cifar10-cond"
DEFAULT_PLANNER = "pipeline.teachers.registry:plan_repo_relative"
DEFAULT_CONFIG_MODEL = "storage_schemas.distill_image:DistillImageConfig"
IN_FLIGHT = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED, StateType.CANCELLING]


def idempotency_key(teacher_id: str, preset: str) -> str:
    return f"{teacher_id}-{recipe_version()}-{preset}"


def load_object(ref: str) -> Any:
    """``'package.module:attribute'`` -> the attribute."""
    module, sep, attr = ref.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"{ref!r} is not of the form 'package.module:attribute'")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load {ref!r}: {e}") from None


def resolve_root(root: str) -> str:
    if artifacts.is_local(root) and not Path(root).expanduser().is_absolute():
        return str((REPO / root).resolve())
    return registry.absolute_uri(root)


@task(name="find-pending-teachers")
def find_pending_task(root: str, preset: str, teacher_ids: list[str], base_config: dict, planner: str,
                      config_model: str) -> list[dict]:
    """Of the registered ``teacher_ids``, those with a missing stage: id, teacher URI, config, missing stages."""
    records = [registry.read_record(root, t) for t in teacher_ids]
    failed: list[dict] = []
    pending = registry.pending_teachers(root, preset, records=records, select=None,
                                        config_model=load_object(config_model), planner=load_object(planner),
                                        base_config=base_config,
                                        on_error=lambda rec, e: failed.append({"teacher_id": rec.id,
                                                                               "error": str(e)}))
    return [{"teacher_id": p.record.id, "teacher_uri": p.record.teacher_uri,
             "config": p.config.model_dump(mode="json"), "missing": list(p.missing)} for p in pending] + failed


def deployment_config(parameters: dict) -> dict:
    """The config a deployment's parameters describe: its ``config`` mapping with the other (top-level)
    parameters merged onto it, as the kdm flow does."""
    config = parameters.get("config")
    top = {k: v for k, v in parameters.items() if k != "config" and v is not None}
    return deep_merge(config if isinstance(config, dict) else {}, top)


def _runs_in_flight(client, deployment_id) -> list:
    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=IN_FLIGHT))))


def _runs_with_key(client, deployment_id, key: str) -> list:
    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        flow_run_filter=FlowRunFilter(idempotency_key=FlowRunFilterIdempotencyKey(any_=[key])))


def _config_teacher_uri(run) -> Optional[str]:
    return deployment_config(run.parameters or {}).get("teacher_uri")


@flow(name="redistill", log_prints=True)
def redistill(root: str = "artifacts", preset: str = "full", deployment: str = DEFAULT_DEPLOYMENT,
              conditional_deployment: Optional[str] = DEFAULT_CONDITIONAL_DEPLOYMENT,
              planner: str = DEFAULT_PLANNER, config_model: str = DEFAULT_CONFIG_MODEL) -> list[dict]:
    """Start a distillation for every registered CIFAR-10-shaped teacher without a finished student.

    ``planner`` and ``config_model`` are 'module:attribute' references (the image pipeline's by default)."""
    logger = get_run_logger()
    root = resolve_root(root)
    access.check_root_allowed(root, "root")   # KDM_ALLOWED_ROOTS of this worker, before reading the registry
    records = [r for r in registry.list_teachers(root) if registry.cifar10_shaped(r)]
    if conditional_deployment is None:
        groups = {deployment: records}
    else:
        groups = {deployment: [r for r in records if not r.conditional],
                  conditional_deployment: [r for r in records if r.conditional]}
    rows: list[dict] = []
    with get_client(sync_client=True) as client:
        for name, group in groups.items():
            if not group:
                continue
            try:
                dep = client.read_deployment_by_name(name)
            except ObjectNotFound:
                raise ValueError(f"deployment {name!r} does not exist on the Prefect server; register it with "
                                 f"`prefect --no-prompt deploy --all` (prefect.yaml)") from None
            dep_params = dict(dep.parameters or {})
            base = deployment_config(dep_params)
            pending = find_pending_task(root, preset, [r.id for r in group], base, planner, config_model)
            busy = {_config_teacher_uri(r): r for r in _runs_in_flight(client, dep.id)}
            for p in pending:
                key = idempotency_key(p["teacher_id"], preset)
                if "error" in p:
                    logger.error("teacher %s: %s", p["teacher_id"], p["error"])
                    rows.append({"teacher": p["teacher_id"], "deployment": name, "idempotency_key": key,
                                 "missing": "", "status": "error", "flow_run": "", "state": p["error"]})
                    continue
                before = {r.id: r for r in _runs_with_key(client, dep.id, key)}
                other = busy.get(p["teacher_uri"])
                row = {"teacher": p["teacher_id"], "deployment": name, "idempotency_key": key,
                       "missing": ", ".join(p["missing"])}
                if not before and other is not None:
                    rows.append(row | {"status": "in flight (other run)", "flow_run": other.name,
                                       "state": other.state_type.value if other.state_type else ""})
                    continue
                # Top-level parameters of the deployment override its config in the flow: send them agreeing.
                params = {"config": p["config"]} | {k: p["config"][k] for k in dep_params
                                                     if k != "config" and k in p["config"]}
                run = run_deployment(name, parameters=params, timeout=0, idempotency_key=key,
                                     flow_run_name=f"{p['teacher_id']}-{preset}", as_subflow=False)
                status = "already started" if run.id in before else "started"
                state = run.state_type.value if run.state_type else ""
                logger.info("%s %s: flow run %s (%s), missing %s", status, p["teacher_id"], run.name, state,
                            row["missing"])
                rows.append(row | {"status": status, "flow_run": run.name, "flow_run_id": str(run.id),
                                   "state": state})
    started = sum(r["status"] == "started" for r in rows)
    if rows:
        create_table_artifact(rows, key="redistill",
                              description=f"redistill tick: {started} started, {len(rows) - started} already "
                                          f"started, in flight or failed to plan (preset {preset}, "
                                          f"{recipe_version()})")
    else:
        create_markdown_artifact(f"# redistill\n\nNothing pending under `{root}`: every registered CIFAR-10 "
                                 f"teacher ({len(records)}) has a finished student for preset `{preset}` "
                                 f"and {recipe_version()}.", key="redistill")
    print(f"redistill: {len(records)} registered teacher(s), {len(rows)} pending, {started} distillation(s) "
          f"started")
    errors = [r for r in rows if r["status"] == "error"]
    if errors:
        raise RuntimeError(f"{len(errors)} registered teacher(s) could not be planned (the others were handled): "
                           + "; ".join(f"{r['teacher']}: {r['state']}" for r in errors))
    return rows
