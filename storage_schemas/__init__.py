"""Single source of truth for every on-disk format and stage config of kdm (pydantic v2)."""
from .common import (PACKAGE_VERSION, SCHEMA_VERSION, ArraySpec, SeedRange, Strict, VersionInputs, code_version,
                     format_validation_error, recipe_version, stable_hash, utc_now)
from .datasets import DATASET_ARRAYS, DATASET_SPLITS, DatasetManifest, DatasetRef, DatasetSplitInfo
from .evaluation import Eval2DConfig, EvaluationReport, MetricSet
from .pairs import (HELDOUT_GROUP, MANIFEST_KEY, PAIR_ARRAYS, FilterRecord, ImportInfo,
                    PairStoreManifest, SamplerSettings, TeacherRef)
from .stages import DistillCheckerboardConfig, FilterConfig, PairsGenerateConfig, PairsImportConfig
from .student import KDM2DConfig, StudentManifest, StudentRunConfig, TrainConfig
from .teacher import (EDM_TEACHER_RUNTIME_FIELDS, CheckerboardSpec, EDMNetConfig, EDMPickleSource,
                      EDMTeacherTrainConfig, FlowMatchingMLPConfig, TeacherManifest, TeacherTrainConfig)

__all__ = [n for n in dir() if not n.startswith("_")]
