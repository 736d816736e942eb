"""Run configs of the data stages and of the end-to-end ``kdm`` flow."""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, model_serializer, model_validator

from .common import SeedRange, Strict, drop_unset
from .evaluation import Eval2DConfig
from .pairs import SamplerSettings
from .student import KDM2DConfig, StudentRunConfig, TrainConfig
from .teacher import FlowMatchingMLPConfig, TeacherTrainConfig

# The CPU-sized `checkerboard` presets (configs/teacher|student/checkerboard.yaml): the flow's defaults,
# so a deployment run without parameters is the documented demo. tests/test_schemas.py keeps the YAML
# presets and these defaults equal.
CHECKERBOARD_TEACHER = TeacherTrainConfig(preset="checkerboard", model=FlowMatchingMLPConfig(hidden=256, layers=3),
                                          lr=1e-3, batch_size=1024, steps=8000, log_every=100)
CHECKERBOARD_STUDENT = StudentRunConfig(
    preset="checkerboard", model=KDM2DConfig(hidden=128, latent_dim=64, use_pred_loss=False),
    train=TrainConfig(lr=3e-3, batch_size=512, steps=12000, ema_decay=0.999, checkpoint_every=2000, log_every=100))


class PairsGenerateConfig(Strict):
    seeds: SeedRange = SeedRange(start=0, stop=50_000)
    heldout_seeds: Optional[SeedRange] = SeedRange(start=50_000, stop=60_000)
    sampler: SamplerSettings = SamplerSettings()
    chunk_size: int = Field(10_000, ge=1, description="pairs per Zarr chunk (and per shard of work)")
    device: Literal["cpu", "cuda"] = "cpu"

    @model_validator(mode="after")
    def _disjoint(self) -> "PairsGenerateConfig":
        if self.heldout_seeds is not None and self.seeds.overlaps(self.heldout_seeds):
            raise ValueError(f"heldout_seeds {self.heldout_seeds.text()} overlap seeds {self.seeds.text()}")
        return self


def _field(field: Optional[str], value: Optional[str] = None) -> str:
    return " ".join(x for x in (field, None if value is None else repr(value)) if x)


def import_options_problem(fmt: str, order: Optional[str], noise_scale: Optional[float],
                           name=_field) -> Optional[str]:
    """What is wrong with the per-format options of an import, or None. ``name(field, value=None)`` spells a
    field (and its value) as the caller's user knows it: config fields by default, the CLI passes its flags."""
    if fmt == "kdm-npz" and order is None:
        return (f"{name('format', 'kdm-npz')} needs {name('order')}: {name(None, 'xT-first')} (the official CIFAR-10 "
                f"unconditional training set) or {name(None, 'x0-first')} (conditional CIFAR-10, FFHQ, AFHQv2, the "
                f"test sets)")
    if fmt != "kdm-npz" and order is not None:
        return f"{name('order')} applies to {name('format', 'kdm-npz')} only, not {name(None, fmt)}"
    if fmt == "kdm-trajectories" and noise_scale is not None:
        return f"{name('noise_scale')} applies to the image formats (kdm-npz, get-pt, npz), not kdm-trajectories"
    return None


class PairsImportConfig(Strict):
    """Import of external pairs (pipeline/pairs/importer.py describes the formats).

    ``order`` (kdm-npz only, required there): which end of ``arr_0`` / ``endpoints`` is x_T: 'xT-first'
    (the official CIFAR-10 unconditional training set) or 'x0-first' (every other official set).
    ``noise_scale`` (image formats): the resulting store has x_T = noise_scale * eps; get-pt files hold
    the unit eps and are multiplied by it, kdm-npz and npz files already hold x_T at this scale (recorded
    as x_T_scale). Default 80 (EDM's sigma_max).
    ``snapshots`` (kdm-trajectories only): keep intermediate entries of the source trajectory as the store's
    snapshots (array ``x_t``): 'all' (every entry between x_T and x_0) or their indices (increasing, in
    [1, T - 2]); the official file's entries are the flow-matching times linspace(0, 1, T).
    Unset options are left out of the dump, so kdm-trajectories versions are unchanged by them.
    """

    format: Literal["kdm-trajectories", "kdm-npz", "get-pt", "npz"] = "kdm-trajectories"
    holdout_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    split_seed: int = 0
    chunk_size: int = Field(10_000, ge=1)
    order: Optional[Literal["xT-first", "x0-first"]] = None
    noise_scale: Optional[float] = Field(None, gt=0)
    snapshots: Optional[Union[Literal["all"], tuple[int, ...]]] = None

    @model_validator(mode="after")
    def _format_options(self) -> "PairsImportConfig":
        problem = import_options_problem(self.format, self.order, self.noise_scale)
        if problem:
            raise ValueError(problem)
        if self.snapshots is not None:
            if self.format != "kdm-trajectories":
                raise ValueError(f"snapshots apply to format kdm-trajectories (a file of whole trajectories), "
                                 f"not {self.format}")
            if self.snapshots != "all" and (not self.snapshots or list(self.snapshots) != sorted(set(self.snapshots))
                                            or min(self.snapshots) < 1):
                raise ValueError(f"snapshots {list(self.snapshots)} must be 'all' or increasing trajectory indices "
                                 f">= 1 (0 is x_T)")
        return self

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        return drop_unset(handler(self), ("order", "noise_scale", "snapshots"))

    @property
    def x_T_scale(self) -> float:
        if self.format == "kdm-trajectories":
            return 1.0
        return self.noise_scale if self.noise_scale is not None else 80.0


class FilterConfig(Strict):
    drop_nonfinite: bool = True
    dedup_seeds: bool = True
    near_duplicate_radius: float = Field(0.0, ge=0, description="0 disables; L2 distance between x_0")
    blocklist_radius: float = Field(0.05, ge=0)
    blocklist_uri: Optional[str] = Field(None, description=".npy file of points (M, *sample_shape)")


class DistillCheckerboardConfig(Strict):
    """The ``checkerboard`` recipe's config (deployment ``kdm/distill-checkerboard``, ``kdm distill --recipe
    checkerboard``): own flow-matching teacher (or imported pairs) -> pairs -> filter -> student -> evaluation.

    ``evaluation_config`` is what the evaluation stage runs: ``evaluation`` without ``teacher_nfe`` for imported
    pairs (no teacher network to cut short)."""

    recipe: Literal["checkerboard"] = "checkerboard"
    preset: str = "checkerboard"
    root: str = Field("artifacts", description="artifact root URL (local path or fsspec URL)")
    source: Literal["teacher", "import"] = "teacher"
    import_uri: Optional[str] = None
    import_config: PairsImportConfig = PairsImportConfig()
    teacher: TeacherTrainConfig = CHECKERBOARD_TEACHER
    pairs: PairsGenerateConfig = PairsGenerateConfig()
    filter: FilterConfig = FilterConfig(near_duplicate_radius=5e-4)
    student: StudentRunConfig = CHECKERBOARD_STUDENT
    evaluation: Eval2DConfig = Field(
        Eval2DConfig(teacher_nfe=(1, 2, 4, 8, 16, 40)),
        description="teacher_nfe cuts the recipe's own teacher short (the frontier); imported pairs have no teacher "
                    "network, so their evaluation leaves it out")

    @model_validator(mode="after")
    def _import_needs_uri(self) -> "DistillCheckerboardConfig":
        if self.source == "import" and not self.import_uri:
            raise ValueError("source='import' needs import_uri (e.g. the kdm-trajectories .npy file)")
        if self.student.model.nfe_train and max(self.student.model.nfe_train) > 1:
            snaps = (self.pairs.sampler.snapshot_steps if self.source == "teacher" else
                     self.import_config.snapshots)
            if snaps is None:
                where = ("pairs.sampler.snapshot_steps" if self.source == "teacher" else "import_config.snapshots")
                raise ValueError(f"student.model.nfe_train {list(self.student.model.nfe_train)} trains on trajectory "
                                 f"snapshots: set {where}")
        return self

    @property
    def evaluation_config(self) -> Eval2DConfig:
        if self.source == "teacher" or self.evaluation.teacher_nfe is None:
            return self.evaluation
        return self.evaluation.model_copy(update={"teacher_nfe": None})
