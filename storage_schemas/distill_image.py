"""Config of the ``cifar10`` recipe (flow ``kdm``, deployments ``kdm/distill-cifar10(-cond)``, ``kdm distill
--recipe cifar10``) and its presets.

One typed config: dataset archive -> offline feature extractor -> EDM teacher (bootstrapped, or an
existing teacher artifact at ``teacher_uri``) -> EDM Heun pairs (train + held-out seeds) -> image KDM
student -> evaluation. ``preset`` names the recipe every field the user did not set comes from:

| preset | teacher | pairs | student | device |
|---|---|---|---|---|
| ``full`` | cifar10-edm (EDM's recipe, 390,625 steps x 512) | 1,000,000 + 50,000 held out, Heun 18 steps (35 NFE) | cifar10-uncond / -cond, 800k steps x 128 (the paper's), lpips-own, bf16, NCHW | cuda |
| ``mini`` | cifar10-mini (1.5k steps x 256) | 20,000 + 5,000 held out, 35 NFE | 64 channels, 1 block, lpips-own, no D, 3k steps x 256, bf16, NCHW | cuda |
| ``smoke`` | 8-channel U-Net, 20 steps | 64 + 32 held out, 35 NFE | 8-channel U-Nets, 20 steps | cpu |

Override semantics (``DistillImageConfig.model_validate``): the input is deep-merged onto the named
preset (``conditional`` picks its class-conditional variant): a nested mapping changes only the keys it
names (``{"preset": "mini", "student": {"train": {"steps": 100}}}`` keeps the rest of mini's student);
a value that is not a mapping (or a model instance) replaces the preset's value whole. Field defaults are
the ``full`` preset, so the JSON schema of the config accepts any partial mapping (server-side validation
of Prefect parameters) and ``DistillImageConfig()`` is the full recipe.

This module is part of the leaf package: pydantic only.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, Field, model_validator

from .common import SCHEMA_VERSION, SeedRange, Strict, deep_merge
from .multistep import FrontierConfig
from .kdm_image import IMAGE_PRESETS, ImageTrainConfig, KDMImageConfig, SongUNetConfig
from .pairs import SamplerSettings
from .stages import PairsGenerateConfig
from .protocol import ExtractorTrainConfig
from .filter_images import ImageFilterConfig
from .perceptual import PerceptualStageConfig
from .teacher import EDMTeacherTrainConfig

PresetName = Literal["smoke", "mini", "full"]
PRESET_NAMES: tuple[str, ...] = ("smoke", "mini", "full")
Device = Literal["cpu", "cuda"]
DEFAULT_DATASET = "cifar10"   # found in $KDM_DATA_DIR (~/.cache/kdm/data) or downloaded: pipeline/data/sources.py
STAGE_NAMES = ("dataset", "extractor", "perceptual", "teacher", "pairs", "filter", "student", "evaluation")
GPU_STAGES = ("teacher", "pairs", "student", "evaluation")   # run on pool kdm-gpu (extractor too when on cuda)


# The students' training distance of the mini and full presets: 'lpips-own', the LPIPS-style distance on the
# recipe's own perceptual network (stage ``perceptual``), the best objective measured on the mini recipe
# (BENCHMARKS.md, "Student objective"): pseudo-Huber students are blurred averages of the teacher.
MINI_DISTANCE = "lpips-own"
FULL_DISTANCE = "lpips-own"
MINI_STUDENT_STEPS = 3000
# The discriminator stays off by default until a variant with it is measured to pay (BENCHMARKS.md): with
# lpips-own its generator term pulls as hard as the distance already at a weight of about 0.01
# (bench/adversarial_scale.py), and 0.05 collapsed the mini student. The paper's setting:
# student.model.adv_weight=0.01.
FULL_ADV_WEIGHT = 0.0
# The full student's engine settings: bf16 autocast, NCHW and (on one GPU, the default) the whole step as one
# CUDA graph. NCHW because with the graph it is the faster layout on the full cifar10-uncond U-Nets at batch
# 128 in every call that timed both (BENCHMARKS.md, "KDM image training step", calls 4-6: 163.0 / 140.2 /
# 142.4 ms NCHW against 205.3 / 181.9 / 181.3 ms channels_last, H200, pseudo-Huber); the CUDA GroupNorm
# kernel wants NCHW. Eager steps (gpus > 1 under DDP) were faster channels_last in the same calls; the
# single-GPU default decides. Not yet timed: the lpips-own network's share of the step in each layout
# (bench/speed_vs_official.py measures it).
FULL_STUDENT_TRAIN = ImageTrainConfig(precision="bf16", channels_last=False)


def ema_for_steps(steps: int) -> float:
    """EMA decay sized to a short run: 1 - 10 / steps in [0.9, 0.999] (an EMA of about a tenth of the run)."""
    return round(min(0.999, max(0.9, 1 - 10 / steps)), 6)


class ImageDatasetStageConfig(Strict):
    name: Literal["cifar10"] = Field(DEFAULT_DATASET, description="the dataset by name: its archive is found in "
                                                                  "$KDM_DATA_DIR (default ~/.cache/kdm/data) or "
                                                                  "downloaded into it, unless archive is given")
    archive: Optional[str] = Field(None, description="an explicit archive (first in the resolution order): an "
                                                     "ImageFolder tar(.gz) (train|test/<class>/<file>) or CIFAR-10's "
                                                     "python release; a relative path resolves against the "
                                                     "repository (flow) or the working directory (kdm distill)")
    chunk_size: int = Field(10_000, ge=1, description="images per Zarr chunk (enters the dataset version)")


class ExtractorStageConfig(Strict):
    """The offline feature extractor (FD-<id> / KID-<id>) trained on the dataset's train split."""

    train: ExtractorTrainConfig = ExtractorTrainConfig()
    train_images: Optional[int] = Field(None, ge=2, description="evenly spaced subset of the train split "
                                                                "(None: all of it)")
    device: Device = Field("cuda", description="where it trains; on cuda the stage runs on pool kdm-gpu")


class ImagePairsStageConfig(Strict):
    """Teacher pairs: EDM Heun from x_T = 80 eps per seed; the held-out seeds are the evaluation's noise."""

    seeds: SeedRange = SeedRange(start=0, stop=1_000_000)
    heldout_seeds: SeedRange = SeedRange(start=1_000_000, stop=1_050_000)
    sampler: SamplerSettings = SamplerSettings(kind="edm-heun", steps=18)
    chunk_size: int = Field(10_000, ge=1, description="pairs per Zarr chunk (and per shard of work)")
    batch_size: Optional[int] = Field(None, ge=1, description="seeds per sampler call (speed only)")

    @model_validator(mode="after")
    def _consistent(self) -> "ImagePairsStageConfig":
        if self.sampler.kind != "edm-heun":
            raise ValueError(f"image teachers are sampled with kind 'edm-heun', not {self.sampler.kind!r}")
        if self.seeds.overlaps(self.heldout_seeds):
            raise ValueError(f"heldout_seeds {self.heldout_seeds.text()} overlap seeds {self.seeds.text()}")
        return self

    def generate_config(self, device: Device) -> PairsGenerateConfig:
        return PairsGenerateConfig(seeds=self.seeds, heldout_seeds=self.heldout_seeds, sampler=self.sampler,
                                   chunk_size=self.chunk_size, device=device)


class ImageStudentStageConfig(Strict):
    preset: str = Field("cifar10-uncond", description="name recorded in the student manifest")
    model: KDMImageConfig = IMAGE_PRESETS["cifar10-uncond"].model_copy(update={"distance": FULL_DISTANCE,
                                                                               "adv_weight": FULL_ADV_WEIGHT})
    train: ImageTrainConfig = FULL_STUDENT_TRAIN


class ImageEvalStageConfig(FrontierConfig):
    """FD/KID of teacher and student outputs on the held-out seeds against the train split, paired MSE
    (and LPIPS when its backbone weights exist), grids.

    The quality-vs-NFE frontier: a multi-step student is scored at every NFE of ``nfe`` (None: those it was
    trained for) and, with ``teacher_nfe`` (e.g. [3, 5, 9, 17, 35]), the teacher's EDM Heun sampler cut short to
    those NFEs from the same held-out noise (``SamplerSettings.at_nfe``); every FD is also given as a ratio to the
    full teacher's. Both are left out of the dump when unset."""

    num_samples: Optional[int] = Field(None, ge=2, description="first N held-out pairs (None: all of them)")
    reference_images: Optional[int] = Field(None, ge=2, description="evenly spaced subset of the train split "
                                                                    "for the reference statistics (None: all)")
    kid_subsets: int = Field(100, ge=1)
    kid_subset_size: int = Field(1000, ge=2, description="capped at the number of samples")
    kid_seed: int = 0
    lpips: bool = Field(True, description="LPIPS-vgg of student vs teacher when the VGG16 weights exist")
    grid_images: int = Field(64, ge=1, description="teacher | student grid size")
    batch_size: int = Field(500, ge=1, description="student sampling / feature batch (speed only)")


class ImageTeacherStageConfig(Strict):
    """What the teacher stage does: verify and use ``teacher_uri``, or bootstrap one with ``bootstrap``."""

    bootstrap: EDMTeacherTrainConfig
    teacher_uri: Optional[str] = None
    conditional: bool = False


def _unet(**kw) -> SongUNetConfig:
    return SongUNetConfig(**kw)


# EDM teacher recipes, equal to configs/teacher/<preset>.yaml (tests/test_distill_image.py checks it).
TEACHER_FULL = EDMTeacherTrainConfig(
    preset="cifar10-edm", unet=_unet(model_channels=128, channel_mult=(2, 2, 2), dropout=0.13), xflip=True,
    batch_size=512, steps=390_625, lr=1e-3, lr_rampup_images=10_000_000, ema_halflife_images=500_000,
    ema_rampup_ratio=0.05, precision="bf16", checkpoint_every=10_000, log_every=500)
TEACHER_MINI = EDMTeacherTrainConfig(
    preset="cifar10-mini", unet=_unet(model_channels=64, channel_mult=(1, 2, 2), num_blocks=2, dropout=0.10),
    xflip=True, batch_size=256, steps=1500, lr=1e-3, lr_rampup_images=500_000, ema_halflife_images=100_000,
    ema_rampup_ratio=0.05, precision="bf16", checkpoint_every=500, log_every=100)
SMOKE_UNET = dict(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(16,), dropout=0.0)
TEACHER_SMOKE = EDMTeacherTrainConfig(
    preset="smoke", unet=_unet(**SMOKE_UNET), batch_size=16, steps=20, lr=1e-3, lr_rampup_images=0,
    ema_halflife_images=500, precision="fp32", preview_samples=16, checkpoint_every=20, log_every=5)


def _student_model(conditional: bool, **changes) -> dict:
    base = IMAGE_PRESETS["cifar10-cond" if conditional else "cifar10-uncond"].model_dump(mode="json")
    for k, v in changes.items():
        if isinstance(v, dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    return base


def _preset_data(name: str, conditional: bool) -> dict:
    """The raw fields of preset ``name`` (mappings only: merged with the user's input, then validated)."""
    student_preset = "cifar10-cond" if conditional else "cifar10-uncond"
    if name == "full":
        d = dict(device="cuda", extractor=ExtractorStageConfig(device="cuda"), teacher=TEACHER_FULL,
                 pairs=ImagePairsStageConfig(), filter=ImageFilterConfig(device="cuda"),
                 student=dict(preset=student_preset, model=_student_model(conditional, distance=FULL_DISTANCE,
                                                                   adv_weight=FULL_ADV_WEIGHT),
                              train=FULL_STUDENT_TRAIN),
                 evaluation=ImageEvalStageConfig())
    elif name == "mini":
        # One GPU, the whole run within 15 minutes: the teacher's preset (TEACHER_MINI, 1,500 steps), 20,000 +
        # 5,000 pairs, and a student of MINI_STUDENT_STEPS steps with the perceptual distance on the engine's fast
        # path (bf16, NCHW, whole-step CUDA graph). BENCHMARKS.md, "Student objective", has the measurements.
        d = dict(device="cuda", extractor=ExtractorStageConfig(device="cuda"), teacher=TEACHER_MINI,
                 pairs=ImagePairsStageConfig(seeds=SeedRange(start=0, stop=20_000),
                                             heldout_seeds=SeedRange(start=20_000, stop=25_000)),
                 filter=ImageFilterConfig(device="cuda"),
                 student=dict(preset=f"{student_preset}-mini",
                              model=_student_model(conditional, unet={"model_channels": 64, "num_blocks": 1},
                                                   distance=MINI_DISTANCE, adv_weight=0.0),
                              train=ImageTrainConfig(steps=MINI_STUDENT_STEPS, batch_size=256, lr=4e-4,
                                                     ema_decay=ema_for_steps(MINI_STUDENT_STEPS), precision="bf16",
                                                     channels_last=False, checkpoint_every=1000, log_every=100)),
                 evaluation=ImageEvalStageConfig())
    elif name == "smoke":
        # CPU, seconds: checks the plumbing of every stage, not quality.
        d = dict(device="cpu",
                 extractor=ExtractorStageConfig(train=ExtractorTrainConfig(width=8, epochs=1, batch_size=64,
                                                                           precision="fp32"),
                                                train_images=2000, device="cpu"),
                 teacher=TEACHER_SMOKE,
                 pairs=ImagePairsStageConfig(seeds=SeedRange(start=0, stop=64),
                                             heldout_seeds=SeedRange(start=64, stop=96), chunk_size=32),
                 filter=ImageFilterConfig(calibration_samples=256, grid_size=16),
                 student=dict(preset=f"{student_preset}-smoke",
                              model=_student_model(conditional, unet=dict(SMOKE_UNET), distance="pseudo-huber",
                                                   adv_weight=0.0),
                              train=ImageTrainConfig(steps=20, batch_size=16, ema_decay=0.9, precision="fp32",
                                                     channels_last=False, checkpoint_every=20, log_every=5,
                                                     buffer_chunks=2, read_threads=1)),
                 evaluation=ImageEvalStageConfig(reference_images=2000, kid_subsets=10, grid_images=16))
    else:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESET_NAMES)}")
    teacher = d["teacher"].model_copy(update={"use_labels": conditional})
    d.update(preset=name, conditional=conditional, teacher=teacher)
    return _plain(d)


def _plain(v: Any) -> Any:
    """Models dumped to mappings, at any depth (so user mappings merge into every level)."""
    if isinstance(v, BaseModel):
        return v.model_dump(mode="json")
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


class DistillImageConfig(Strict):
    """The ``cifar10`` recipe's config (deployments ``kdm/distill-cifar10(-cond)``, ``kdm distill --recipe
    cifar10``; see the module docstring)."""

    recipe: Literal["cifar10"] = "cifar10"
    preset: PresetName = Field("full", description="recipe of every field not set: smoke | mini | full")
    conditional: bool = Field(False, description="class-conditional teacher and student (cifar10-cond)")
    root: str = Field("artifacts", description="artifact root URL; a relative path resolves like dataset.archive")
    device: Device = Field("cuda", description="device of the GPU stages (teacher, pairs, student, evaluation)")
    gpus: int = Field(1, ge=1, description="processes of the pairs and student stages: 1 runs them in the stage's "
                                           "process, N > 1 under torchrun (one per GPU on cuda, gloo on cpu); "
                                           "enters no artifact version")
    dataset: ImageDatasetStageConfig = ImageDatasetStageConfig()
    extractor: ExtractorStageConfig = ExtractorStageConfig()
    teacher_uri: Optional[str] = Field(None, description="an existing EDM teacher artifact to distill (verified "
                                                         "by its sha256) instead of bootstrapping one")
    teacher: EDMTeacherTrainConfig = TEACHER_FULL
    pairs: ImagePairsStageConfig = ImagePairsStageConfig()
    filter: ImageFilterConfig = ImageFilterConfig(device="cuda")
    perceptual: PerceptualStageConfig = Field(PerceptualStageConfig(), description="the lpips-own distance's "
                                              "network (a stage only when student.model.distance is lpips-own)")
    student: ImageStudentStageConfig = ImageStudentStageConfig()
    evaluation: ImageEvalStageConfig = ImageEvalStageConfig()

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        name = data.get("preset", "full")
        cond = data.get("conditional", False)
        if name not in PRESET_NAMES or not isinstance(cond, bool):
            return data   # the fields' own validation names the problem (preset: smoke | mini | full)
        return deep_merge(_preset_data(name, cond), data)

    @model_validator(mode="after")
    def _consistent(self) -> "DistillImageConfig":
        cond = self.conditional
        if self.teacher.use_labels != cond:
            raise ValueError(f"teacher.use_labels={self.teacher.use_labels} but conditional={cond}: set conditional "
                             f"instead (it picks the teacher and the student of the preset's variant)")
        if bool(self.student.model.label_dim) != cond:
            raise ValueError(f"student.model.label_dim={self.student.model.label_dim} but conditional={cond}: a "
                             f"conditional run needs label_dim = the number of classes, an unconditional one 0")
        if self.evaluation.num_samples is not None and self.evaluation.num_samples > len(self.pairs.heldout_seeds):
            raise ValueError(f"evaluation.num_samples={self.evaluation.num_samples} exceeds the "
                             f"{len(self.pairs.heldout_seeds)} held-out seeds")
        if self.student.model.noise_scale != self.pairs.sampler.noise_scale:
            raise ValueError(f"student.model.noise_scale={self.student.model.noise_scale} differs from the pairs' "
                             f"x_T scale pairs.sampler.noise_scale={self.pairs.sampler.noise_scale}")
        return self

    def teacher_stage(self) -> ImageTeacherStageConfig:
        return ImageTeacherStageConfig(bootstrap=self.teacher, teacher_uri=self.teacher_uri,
                                       conditional=self.conditional)


def distill_image_preset(name: str, conditional: bool = False) -> DistillImageConfig:
    """The config of preset ``name`` (smoke | mini | full), unconditional or class-conditional."""
    return DistillImageConfig.model_validate({"preset": name, "conditional": conditional})


class ImageEvaluationManifest(Strict):
    """``<root>/evaluations/<version>/manifest.json`` (written last) of an image evaluation: what was
    evaluated, the report file (storage_schemas.protocol.ImageMetricReport), the plots and headline numbers."""

    format: Literal["kdm-image-evaluation"] = "kdm-image-evaluation"
    schema_version: int = SCHEMA_VERSION
    version: str
    dataset_version: str
    extractor_id: str
    teacher_id: Optional[str] = None
    pairs_version: str
    student_version: str
    config: ImageEvalStageConfig
    report_file: str = "metrics.json"
    plots: dict[str, str] = Field(default_factory=dict, description="name -> PNG file beside the manifest")
    summary: dict[str, Optional[float]] = Field(
        default_factory=dict, description="fd_teacher, fd_student, fd_ratio, kid_teacher, kid_student, mse, lpips")
    metric_names: dict[str, str] = Field(default_factory=dict, description="fd / kid -> the metrics' names")
    notes: dict[str, str] = Field(default_factory=dict, description="e.g. why LPIPS is absent")
    num_samples: int
    code_version: str
    created: str
