"""Single source of truth for every on-disk format and stage config of kdm (pydantic v2).

Names are loaded on first use (``from storage_schemas import PairStoreManifest`` imports only
``storage_schemas.pairs`` and what it needs): building every schema costs a command about 0.1 s it
need not pay to print an error.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "common": ("PACKAGE_VERSION", "SCHEMA_VERSION", "ArraySpec", "SeedRange", "Strict", "VersionInputs",
               "code_version", "format_validation_error", "recipe_version", "stable_hash", "utc_now"),
    "datasets": ("DATASET_ARRAYS", "DATASET_SPLITS", "DatasetManifest", "DatasetRef", "DatasetSource",
                 "DatasetSplitInfo"),
    "evaluation": ("Eval2DConfig", "EvaluationReport", "MetricSet"),
    "pairs": ("HELDOUT_GROUP", "MANIFEST_KEY", "PAIR_ARRAYS", "SNAPSHOT_ARRAY", "FilterRecord", "ImportInfo",
              "PairStoreManifest", "SamplerSettings", "Snapshots", "TeacherRef", "store_arrays"),
    "stages": ("DistillCheckerboardConfig", "FilterConfig", "PairsGenerateConfig", "PairsImportConfig"),
    "student": ("KDM2DConfig", "StudentManifest", "StudentRunConfig", "TrainConfig"),
    "teacher": ("EDM_TEACHER_RUNTIME_FIELDS", "CheckerboardSpec", "EDMNetConfig", "EDMPickleSource",
                "EDMTeacherTrainConfig", "FlowMatchingMLPConfig", "TeacherManifest", "TeacherTrainConfig"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'storage_schemas' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
