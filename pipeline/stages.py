"""The stage skeleton, written once for every stage of every recipe.

A stage turns its inputs (the output URIs of earlier stages) and the run's config into one artifact
under the root, content-addressed::

  <root>/<kind>/<version>/      version = hash(inputs' versions, config, recipe version)

Every stage goes through ``run_stage``: compute the output URI from the inputs and the config without doing
any work (``Stage.output``); if it is committed, summarise it and report ``skipped``; otherwise run the
stage (in this process, or on the GPU pool through ``dispatch``), which writes under ``<uri>.partial`` and
commits by writing the manifest last (``pipeline.storage.artifacts``), then summarise what was committed.
A summary is a small JSON-able dict (URI, version, counts, headline numbers), never arrays; long stages
report progress through ``StageContext.progress``. ``run_recipe`` runs a recipe's ordered list
(``pipeline.recipes``), ``plan`` lists every stage's output, version and state without running anything
(``--dry-run``), and ``run_request`` runs one stage as the ``gpu-stage`` flow receives it. Both the Prefect
flow ``kdm`` and ``kdm distill`` call these, so a stage behaves the same with and without Prefect.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from pipeline.errors import KDMError
from pipeline.storage import artifacts

CPU_POOL, GPU_POOL = "kdm-cpu", "kdm-gpu"


@dataclass
class StageContext:
    """What a running stage may report: a progress fraction with a message, and log lines."""

    progress_bars: bool = True                                   # tqdm bars on a terminal
    on_progress: Optional[Callable[[str, float, str], None]] = None   # (stage, fraction 0..1, message)
    log: Callable[[str], None] = print
    stage: str = ""

    def progress(self, fraction: float, message: str = "") -> None:
        if self.on_progress is not None:
            self.on_progress(self.stage, min(max(fraction, 0.0), 1.0), message)


class Stage(ABC):
    """One stage of a recipe. Subclasses set ``name``, ``kind`` and ``inputs`` and implement ``output``,
    ``run`` and ``summary`` (abstract: a stage lacking one cannot be built); ``pool`` and ``done`` have
    defaults."""

    name: str = ""
    kind: str = ""                      # artifact family under the root: "pairs", "students", ...
    inputs: tuple[str, ...] = ()        # names of the stages whose output URIs it reads
    progress_label: str = ""            # a progress bar in the UI when set

    def check(self, cfg: Any) -> None:
        """Checks of the config that need no input (e.g. a given artifact); raises KDMError."""

    @abstractmethod
    def output(self, cfg: Any, uris: dict[str, str]) -> str:
        """The output URI (``<root>/<kind>/<version>``) from the inputs and the config; no work."""

    @abstractmethod
    def run(self, cfg: Any, uris: dict[str, str], out: str, ctx: StageContext) -> dict:
        """Make the artifact at ``out`` (under ``<out>.partial``, manifest last); returns extra summary
        fields of this run (e.g. ``resumed_from_step``)."""

    @abstractmethod
    def summary(self, cfg: Any, uris: dict[str, str], out: str) -> dict:
        """Small dict of the committed artifact (uri, version and headline numbers)."""

    def lineage(self, s: dict) -> str:
        """One line of the report's lineage."""
        return f"{self.name} `{s['version']}`"

    def pool(self, cfg: Any) -> Optional[str]:
        """Work pool the stage runs on in the flow (None: nothing to run)."""
        return CPU_POOL

    def device(self, cfg: Any) -> str:
        return "cpu"

    def done(self, out: str) -> bool:
        return artifacts.committed(out)

    def version(self, out: str) -> str:
        return Path(str(out).rstrip("/")).name


class DevicePooled(Stage):
    """A stage that runs where its own ``device`` setting says: on kdm-gpu when that is cuda, else kdm-cpu."""

    def pool(self, cfg: Any) -> Optional[str]:
        return GPU_POOL if self.device(cfg) == "cuda" else CPU_POOL


Dispatch = Callable[[Stage, Any, dict, str], None]   # (stage, cfg, uris, out): run it elsewhere, wait


def check_device(device: str, stage: str) -> None:
    """A GPU stage asked for cuda on a machine without one fails; it never falls back to the CPU."""
    from pipeline.devices import resolve_device
    try:
        resolve_device(device)
    except KDMError as e:
        raise KDMError(f"{stage} stage: {e}") from None


def run_stage(stage: Stage, cfg: Any, uris: dict[str, str], ctx: Optional[StageContext] = None,
              dispatch: Optional[Dispatch] = None) -> dict:
    """Run one stage through the skeleton; returns its summary with ``skipped`` (it existed already)."""
    ctx = ctx or StageContext()
    ctx.stage = stage.name
    ins = {k: uris[k] for k in stage.inputs}
    stage.check(cfg)
    out = stage.output(cfg, ins)
    if stage.done(out):
        return {**stage.summary(cfg, ins, out), "skipped": True}
    extra: dict = {}
    if dispatch is not None and stage.pool(cfg) == GPU_POOL:
        dispatch(stage, cfg, ins, out)
        if not stage.done(out):
            raise KDMError(f"{stage.name} stage completed on pool {GPU_POOL} but its output {out} is not visible "
                           f"here: the artifact root must be storage both pools share")
    else:
        if stage.pool(cfg) == GPU_POOL:
            check_device(stage.device(cfg), stage.name)
        extra = stage.run(cfg, ins, out, ctx) or {}
        if not stage.done(out):
            raise KDMError(f"{stage.name} stage finished without committing {out}")
    ctx.progress(1.0, "done")
    return {**stage.summary(cfg, ins, out), **extra, "skipped": False}


def run_recipe(cfg: Any, ctx: Optional[StageContext] = None, dispatch: Optional[Dispatch] = None,
               on_stage: Optional[Callable[[Stage, dict], None]] = None) -> dict:
    """Every stage of ``cfg.recipe`` in order; returns {stage name: summary}."""
    from pipeline.recipes import stages_of
    ctx = ctx or StageContext()
    results: dict[str, dict] = {}
    uris: dict[str, str] = {}
    for stage in stages_of(cfg):
        res = run_stage(stage, cfg, uris, ctx, dispatch)
        results[stage.name], uris[stage.name] = res, res["uri"]
        ctx.log(f"{stage.name:<11}{'(exists, skipped) ' if res['skipped'] else ''}{res['uri']}")
        if on_stage is not None:
            on_stage(stage, res)
    return results


def plan(cfg: Any) -> dict:
    """Dry run: each stage's output URI, version, pool and whether it exists, without running anything.

    Returns ``{"recipe", "preset", "root", "stages": {name: {"uri", "version", "exists", "pool"}}, "todo",
    "complete"}``. A version that depends on an output not yet made (e.g. the pairs of a teacher still to
    train) is None, with ``"after": <first missing input>``; a version computable from its inputs' versions
    alone (they are the last part of the inputs' URIs) is known before they exist."""
    from pipeline.recipes import stages_of
    stages: dict[str, dict] = {}
    uris: dict[str, str] = {}
    for stage in stages_of(cfg):
        unknown = [k for k in stage.inputs if k not in uris]
        missing = [k for k in stage.inputs if not stages[k]["exists"]]
        stage.check(cfg)
        out, after = None, None
        if not unknown:
            try:
                out = stage.output(cfg, {k: uris[k] for k in stage.inputs})
            except Exception as e:
                after = getattr(e, "plan_after", None)     # e.g. a dataset the run downloads first
                if not missing and not after:
                    raise            # every input exists: the error is the config's, not the plan's
        if out is None:
            stages[stage.name] = {"uri": None, "version": None, "exists": False, "pool": stage.pool(cfg),
                                  "after": after or (unknown or missing)[0]}
            continue
        uris[stage.name] = out
        stages[stage.name] = {"uri": out, "version": stage.version(out), "exists": stage.done(out),
                              "pool": stage.pool(cfg)}
        if stage.pool(cfg) is None:
            stages[stage.name]["given"] = True
    todo = [n for n, s in stages.items() if not s["exists"]]
    return {"recipe": cfg.recipe, "preset": cfg.preset, "root": cfg.root, "stages": stages, "todo": todo,
            "complete": not todo}


def format_plan(p: dict) -> str:
    lines = [f"{'stage':<11} {'state':<8} {'pool':<8} version / uri"]
    for name, s in p["stages"].items():
        state = "given" if s.get("given") else ("done" if s["exists"] else "to do")
        where = s["uri"] or f"(known after the {s.get('after')} stage)"
        lines.append(f"{name:<11} {state:<8} {s['pool'] or '-':<8} {where}")
    return "\n".join(lines)


def run_request(request, ctx: Optional[StageContext] = None) -> dict:
    """One stage of a ``storage_schemas.recipes.StageRequest`` (what the ``gpu-stage`` flow runs)."""
    from pipeline.recipes import stage_named
    stage = stage_named(request.config, request.stage)
    missing = sorted(set(stage.inputs) - set(request.inputs))
    if missing:
        raise KDMError(f"{request.stage} stage request lacks the input URIs of {', '.join(missing)}")
    return run_stage(stage, request.config, dict(request.inputs), ctx)


def resolve_local(v: Optional[str], base) -> Optional[str]:
    """A relative local path taken relative to ``base``; a leading ``$KDM_DATA_DIR/`` is the data directory
    (pipeline.data.sources.data_dir); absolute paths and URLs unchanged."""
    from pipeline.data.sources import expand_data_dir
    v = expand_data_dir(v)
    if v and artifacts.is_local(v) and not Path(v).expanduser().is_absolute():
        return str((Path(base) / v).resolve())
    return v


def resolve_paths(cfg: Any, base) -> Any:
    """Relative local paths of the config (root and the recipe's input files) resolve against ``base``."""
    def res(v: Optional[str]) -> Optional[str]:
        return resolve_local(v, base)
    if cfg.recipe == "cifar10":
        return cfg.model_copy(update={"root": res(cfg.root), "teacher_uri": res(cfg.teacher_uri),
                                      "dataset": cfg.dataset.model_copy(update={"archive": res(cfg.dataset.archive)})})
    return cfg.model_copy(update={"root": res(cfg.root), "import_uri": res(cfg.import_uri)})


@dataclass
class Report:
    """What the publisher shows for a run of any recipe (the flow turns it into Prefect artifacts)."""

    title: str
    key: str
    lineage: list[str]
    metrics: list[dict]
    headline: str
    protocol: str
    images: dict[str, str] = field(default_factory=dict)      # name -> URI of a PNG artifact file
    links: dict[str, str] = field(default_factory=dict)       # stage -> artifact URI
    notes: list[str] = field(default_factory=list)
    metrics_markdown: str = ""                                 # the metrics as the recipe renders them
    metrics_description: str = ""
