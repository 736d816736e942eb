"""KDM student: model config, training config, and the checkpoint manifest of a training run.

A run directory holds ``config.json``, ``metrics.jsonl``, ``checkpoints/step-NNNNNNNN/`` (full resume
state) and, once finished, ``student.safetensors`` (EMA weights) + ``manifest.json`` (written last).
"""
from __future__ import annotations

import math
from typing import Literal, Optional

from pydantic import Field, model_serializer, model_validator

from .common import SCHEMA_VERSION, Strict, VersionInputs, drop_unset
from .multistep import (ANCHOR_RHO_DOC, MULTISTEP_FIELDS, TRAJECTORY_EVERY_DOC, TRAJECTORY_OUTPUT_DOC,
                        MultiStepRun, nfe_train_problem)
from .pairs import Snapshots


class KDM2DConfig(Strict):
    """KDM for 2-D points (official checkerboard code, sizes configurable)."""

    kind: Literal["kdm-2d"] = "kdm-2d"
    dim: int = Field(2, ge=1)
    hidden: int = Field(256, ge=4)
    latent_dim: int = Field(256, ge=2)
    encoder_layers: int = Field(5, ge=1, description="Linear+Swish layers of each encoder")
    decoder_layers: int = Field(5, ge=2, description="Linear layers of the decoder (last has no activation)")
    operator: Literal["linear", "factorized"] = "linear"
    latent_noise: float = Field(0.4, ge=0, description="std of the Gaussian noise added to z_0 and z_T")
    use_pred_loss: bool = Field(True, description="L_pred of the paper; the official checkerboard code drops it")
    spectral_loss: Literal["none", "inverse", "unit-disk-uniform"] = Field(
        "none", description="KDM-F only: penalty on P_inv P and/or the eigenvalues")
    time_T: float = 1.0
    fourier_features: int = Field(
        0, ge=0, le=12, description="F > 0: both encoders also see sin/cos(fourier_scale * 2^k * x), k < F, of "
                                    "each coordinate (not in the official code; 0 = off)")
    fourier_scale: float = Field(1.0, gt=0, description="lowest Fourier feature frequency (radians per unit)")
    nfe_train: Optional[tuple[int, ...]] = Field(
        None, description="multi-step student (models.multistep): the NFEs it samples with, each trained on the "
                          "pair store's trajectory snapshots, e.g. [1, 2, 4] (1 is always included); None: the "
                          "paper's one-step student (snapshots are not read)")
    trajectory_rows: Optional[int] = Field(
        None, ge=1, description="multi-step student: rows of each batch that train the trajectory terms (intermediate "
                                "segments, self-anchored rounds, reconstructions); None: the whole batch. The one-step "
                                "terms always use the whole batch")

    trajectory_output: Optional[bool] = Field(None, description=TRAJECTORY_OUTPUT_DOC)
    anchor_rho: Optional[float] = Field(None, ge=1, description=ANCHOR_RHO_DOC)
    trajectory_every: Optional[int] = Field(None, ge=1, description=TRAJECTORY_EVERY_DOC)

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):        # versions of one-step students stay what they were
        return drop_unset(handler(self), MULTISTEP_FIELDS)

    @model_validator(mode="after")
    def _spectral_needs_factorized(self) -> "KDM2DConfig":
        if self.spectral_loss != "none" and self.operator != "factorized":
            raise ValueError("spectral_loss requires operator='factorized' (KDM-F)")
        if self.fourier_features == 0 and self.fourier_scale != 1.0:
            raise ValueError("fourier_scale is set but fourier_features is 0 (Fourier features off)")
        problem = nfe_train_problem(self)
        if problem:
            raise ValueError(problem)
        return self


class TrainConfig(Strict):
    lr: float = Field(3e-4, gt=0)
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="'cosine': lr decays from lr to lr_min over the steps (half a cosine period)")
    lr_min: float = Field(0.0, ge=0, description="final lr of the cosine schedule")
    batch_size: int = Field(4096, ge=1)
    steps: int = Field(4000, ge=1)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(50, ge=1)
    seed: int = 0
    device: Literal["cpu", "cuda"] = "cpu"
    threads: int = Field(0, ge=0, description="torch intra-op threads; 0 = torch default")

    @model_validator(mode="after")
    def _lr_min_needs_cosine(self) -> "TrainConfig":
        if self.lr_schedule == "constant" and self.lr_min != 0.0:
            raise ValueError("lr_min is the final lr of lr_schedule='cosine'; the constant schedule has none")
        if self.lr_min > self.lr:
            raise ValueError(f"lr_min ({self.lr_min}) exceeds lr ({self.lr})")
        return self

    def lr_at(self, step: int) -> float:
        """Learning rate of optimiser step ``step`` (0-based)."""
        if self.lr_schedule == "constant":
            return self.lr
        progress = min(step, self.steps) / self.steps
        return self.lr_min + (self.lr - self.lr_min) * 0.5 * (1.0 + math.cos(math.pi * progress))


class StudentRunConfig(Strict):
    """Everything `kdm train` needs besides the pair store; what presets and --config files hold."""

    preset: str = "custom"
    model: KDM2DConfig = KDM2DConfig()
    train: TrainConfig = TrainConfig()


class StudentManifest(MultiStepRun, Strict):
    format: Literal["kdm-student"] = "kdm-student"
    schema_version: int = SCHEMA_VERSION
    version: str
    version_inputs: Optional[VersionInputs] = Field(
        None, description="what the version hashes; every read recomputes it (absent in runs from before it existed)")
    model: KDM2DConfig
    train: TrainConfig
    preset: str
    pairs_version: str
    pairs_content_hash: str
    teacher_id: Optional[str] = None
    steps_done: int
    weights_file: str = "student.safetensors"
    weights_sha256: str
    weights_are_ema: bool = True
    snapshots: Optional[Snapshots] = Field(
        None, description="multi-step students: the trajectory snapshots of the pairs it was trained on; it samples "
                          "with 1 to snapshots.count + 1 network evaluations (models.multistep). None: one-step")
    trainable_parameters: int
    final_losses: dict[str, float]
    train_seconds: float
    code_version: str
    created: str

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        return drop_unset(handler(self), ("snapshots",))

    @model_validator(mode="after")
    def _version_is_its_inputs_hash(self) -> "StudentManifest":
        if self.version_inputs is not None:
            self.version_inputs.check(self.version, pairs_version=self.pairs_version)
        return self
