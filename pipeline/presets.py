"""Presets: YAML files under configs/ loaded into the typed configs of storage_schemas.

``configs/<family>/<name>.yaml``, families: ``teacher`` (TeacherTrainConfig), ``student``
(StudentRunConfig), ``distill`` (DistillCheckerboardConfig). Inside a distill preset, ``teacher`` and
``student`` may be ``{preset: NAME, ...overrides}``. ``--set a.b=value`` overrides any field (YAML value).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable, Type, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from storage_schemas import DistillCheckerboardConfig, StudentRunConfig, TeacherTrainConfig, format_validation_error
from storage_schemas.common import deep_merge

from pipeline.errors import KDMError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
FAMILIES: dict[str, Type[BaseModel]] = {"teacher": TeacherTrainConfig, "student": StudentRunConfig,
                                        "distill": DistillCheckerboardConfig}
M = TypeVar("M", bound=BaseModel)


def available(family: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / family).glob("*.yaml"))


def _load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise KDMError(f"{path} is not valid YAML{where}: {problem}; fix the file and rerun") from None
    if not isinstance(data, dict):
        raise KDMError(f"{path} must hold a mapping of config fields, got {type(data).__name__}")
    return data


def raw_preset(family: str, name: str) -> dict:
    path = CONFIG_DIR / family / f"{name}.yaml"
    if not path.exists():
        raise KDMError(f"unknown {family} preset {name!r}; available: {', '.join(available(family)) or 'none'}")
    data = _load_yaml(path)
    if family in ("teacher", "student"):
        data.setdefault("preset", name)
    if family == "distill":
        for key in ("teacher", "student"):
            sub = data.get(key)
            if isinstance(sub, dict) and "preset" in sub:
                base = raw_preset(key, sub["preset"])
                data[key] = deep_merge(base, {k: v for k, v in sub.items() if k != "preset"})
    return data


def apply_sets(data: dict, sets: Iterable[str]) -> dict:
    data = copy.deepcopy(data)
    for item in sets:
        if "=" not in item:
            raise KDMError(f"--set {item!r}: expected key=value, e.g. --set train.steps=2000")
        key, value = item.split("=", 1)
        try:
            parsed: Any = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise KDMError(f"--set {key}: {p} is not a section")
        node[parts[-1]] = parsed
    return data


def validate(model: Type[M], data: dict, source: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise KDMError(format_validation_error(e, source)) from None


def raw_config(family: str, preset: str | None = None, config_file: str | None = None,
               defaults: str | None = None) -> tuple[dict, str]:
    """The raw fields of a preset of ``family`` or of a YAML/JSON file (neither: {}), and where they came
    from (for messages; ``defaults`` names the empty case, default '<family> defaults')."""
    if preset and config_file:
        raise KDMError("give either --preset or --config, not both")
    if config_file:
        path = Path(config_file)
        if not path.exists():
            raise KDMError(f"config file {config_file} does not exist")
        return _load_yaml(path), str(path)
    if preset:
        return raw_preset(family, preset), f"{family} preset {preset!r}"
    return {}, defaults or f"{family} defaults"


def validate_with_sets(model: Type[M], data: dict, source: str, sets: Iterable[str] = ()) -> M:
    """``data`` with the ``--set`` overrides applied, validated as ``model``."""
    sets = list(sets)
    if sets:
        source += " with --set " + " ".join(sets)
    return validate(model, apply_sets(data, sets), source)


def load(family: str, preset: str | None = None, config_file: str | None = None,
         sets: Iterable[str] = ()) -> Any:
    """A typed config from a preset or a YAML/JSON file, then ``--set`` overrides."""
    data, source = raw_config(family, preset, config_file)
    if family == "teacher" and data.get("kind") == "edm-teacher":
        raise KDMError(f"{source} is an EDM image teacher: train it with `kdm teacher bootstrap --preset NAME "
                       f"--dataset DATASET --out DIR` (pipeline.teachers.bootstrap), not `kdm teacher train`")
    return validate_with_sets(FAMILIES[family], data, source, sets)
