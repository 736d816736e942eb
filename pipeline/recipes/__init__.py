"""Recipes as data: each recipe is an ordered list of stages over the one skeleton of ``pipeline.stages``.

  cifar10:      dataset -> extractor -> teacher -> pairs -> filter -> student -> evaluation -> report
  checkerboard: teacher | import ----------------> pairs -> filter -> student -> evaluation -> report

``stages_of(cfg)`` is the list of ``cfg.recipe`` (``cifar10`` | ``checkerboard``), ``build_config`` turns
the flow's parameters (or the CLI's preset and ``--set`` overrides) into one validated
``storage_schemas.recipes.KdmConfig``, and ``build_report`` makes the run report every recipe publishes
(lineage, metrics with their protocol, images, links). What differs by data kind lives in the recipe
modules (``checkerboard``, ``cifar10``): their teacher, filter, student and evaluation stages and the
few report parts that really differ; ``common`` holds the stages both share.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

from pydantic import BaseModel, TypeAdapter, ValidationError

from pipeline.errors import KDMError
from pipeline.recipes import checkerboard, cifar10
from pipeline.stages import Report, Stage
from storage_schemas import format_validation_error
from storage_schemas.common import deep_merge
from storage_schemas.recipes import DEFAULT_PRESET, RECIPE_NAMES, RECIPE_PRESETS, KdmConfig

RECIPES = {"cifar10": cifar10, "checkerboard": checkerboard}
REPORT_STAGE = "report"


def stages_of(cfg) -> list[Stage]:
    """The ordered stages of ``cfg.recipe`` (the report follows the last one)."""
    return RECIPES[cfg.recipe].stages(cfg)


def stage_names(cfg) -> list[str]:
    return [s.name for s in stages_of(cfg)] + [REPORT_STAGE]


def stage_named(cfg, name: str) -> Stage:
    for s in stages_of(cfg):
        if s.name == name:
            return s
    raise KDMError(f"recipe {cfg.recipe} has no stage {name!r}; its stages: {', '.join(stage_names(cfg))}")


def _plain(v: Any) -> Any:
    if isinstance(v, BaseModel):
        return v.model_dump(mode="json", exclude_unset=True)
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def build_config(config: Any = None, sets: Iterable[str] = (), **fields: Any):
    """One validated KdmConfig from a config mapping (or a complete config), top-level fields (None = not
    given; they win over ``config``) and ``--set key=value`` overrides, deep-merged onto the recipe's preset
    (cifar10: smoke | mini | full; checkerboard: ``configs/distill/<preset>.yaml``). The recipe comes from
    ``recipe`` (field or config), default checkerboard. Raises KDMError with the field's path."""
    from pipeline import presets
    if isinstance(config, BaseModel):
        for key in ("recipe", "preset", "conditional"):
            if fields.get(key) is not None and fields[key] != getattr(config, key, fields[key]):
                raise KDMError(f"{key}={fields[key]!r} contradicts the given config's {key}={getattr(config, key)!r}: "
                               f"pass the config as a mapping to rebase it on a preset")
        raw = config.model_dump(mode="json")
    elif isinstance(config, dict):
        raw = dict(config)
    elif config is None:
        raw = {}
    else:
        raise KDMError(f"config must be a mapping of config fields, got {type(config).__name__}")
    data = deep_merge(raw, {k: _plain(v) for k, v in fields.items() if v is not None})
    data = presets.apply_sets(data, sets)
    recipe = data.setdefault("recipe", "checkerboard")
    if recipe not in RECIPE_NAMES:
        raise KDMError(f"unknown recipe {recipe!r}; valid: {', '.join(RECIPE_NAMES)}")
    preset = data.setdefault("preset", DEFAULT_PRESET[recipe])
    known = RECIPE_PRESETS[recipe] + (tuple(presets.available("distill")) if recipe == "checkerboard" else ())
    if preset not in known:
        raise KDMError(f"recipe {recipe} has no preset {preset!r}; valid: {', '.join(dict.fromkeys(known))}")
    if recipe == "checkerboard":
        data = deep_merge(presets.raw_preset("distill", preset), data)
    source = f"recipe {recipe}, preset {preset}"
    try:
        return TypeAdapter(KdmConfig).validate_python(data)
    except ValidationError as e:
        raise KDMError(format_validation_error(e, source)) from None


def build_report(cfg, results: dict) -> Report:
    """The run report of any recipe: lineage (one line per stage), metrics, protocol, images, links."""
    from pipeline.storage import artifacts
    parts = RECIPES[cfg.recipe].report_parts(cfg, results)
    lineage = [s.lineage(results[s.name]) for s in stages_of(cfg) if s.name in results]
    ev = results["evaluation"]
    images = {name: artifacts.join(ev["uri"], fname) for name, fname in ev.get("plots", {}).items()}
    if results.get("filter", {}).get("grid"):
        images["filter_closest_matches"] = results["filter"]["grid"]      # generated | nearest training image
    links = {name: r["uri"] for name, r in results.items()}
    return Report(title=parts["title"], key=slug(parts["key"]), lineage=lineage, metrics=parts["metrics"],
                  headline=parts["headline"], protocol=parts["protocol"], images=images, links=links,
                  notes=parts["notes"], metrics_markdown=parts["table_text"],
                  metrics_description=parts["metrics_description"])


def link(uri: str) -> str:
    """A browsable link to an artifact: file:// for a local path, the URL otherwise."""
    from pathlib import Path
    from pipeline.storage import artifacts
    return Path(uri).resolve().as_uri() if artifacts.is_local(uri) else uri


def slug(text: str) -> str:
    return "-".join(p for p in "".join(c if c.isalnum() else "-" for c in text.lower()).split("-") if p)


def report_markdown(cfg, report: Report, image_uris: Optional[dict[str, str]] = None) -> str:
    """The report as markdown (images inline as the given URIs, e.g. data: URIs for the Prefect UI)."""
    md = [f"# {report.title}", "", "## Lineage", "",
          "\n".join(f"{i + 1}. {line}" for i, line in enumerate(report.lineage)), "", "## Metrics", "",
          report.metrics_markdown, ""]
    if report.headline:
        md += [report.headline, ""]
    md += [report.protocol]
    md += [f"\n{n}" for n in report.notes]
    md += ["", "## Images", ""] + [f"![{name}]({uri})" for name, uri in (image_uris or {}).items()]
    md += ["", "## Artifacts", ""] + [f"- {n}: [{u}]({link(u)})" for n, u in report.links.items()]
    md += ["", "## Config", "", "```json", cfg.model_dump_json(indent=2), "```"]
    return "\n".join(md)


