"""Teacher artifact: ``weights.safetensors`` + ``config.json`` + ``manifest.json`` (written last)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from .common import SCHEMA_VERSION, Strict


class CheckerboardSpec(Strict):
    """The official KDM board: x1 ~ U(-2, 2), x2 in cells with floor(x1)+floor(x2) even, / scale."""

    low: float = -2.0
    high: float = 2.0
    scale: float = Field(0.45, gt=0)


class FlowMatchingMLPConfig(Strict):
    """Velocity MLP v(x, t) for the conditional OT path x_t = (1 - t) x_noise + t x_data."""

    kind: Literal["flow-matching-mlp"] = "flow-matching-mlp"
    dim: int = Field(2, ge=1)
    hidden: int = Field(512, ge=8)
    layers: int = Field(4, ge=1, description="hidden Swish layers")


class TeacherTrainConfig(Strict):
    preset: str = "custom"
    model: FlowMatchingMLPConfig = FlowMatchingMLPConfig()
    data: CheckerboardSpec = CheckerboardSpec()
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(4096, ge=1)
    steps: int = Field(3000, ge=1)
    seed: int = 0
    device: Literal["cpu", "cuda"] = "cpu"
    log_every: int = Field(100, ge=1)


class TeacherManifest(Strict):
    format: Literal["kdm-teacher"] = "kdm-teacher"
    schema_version: int = SCHEMA_VERSION
    id: str = Field(description="content-addressed version of the teacher")
    kind: Literal["flow-matching-mlp"]
    model: FlowMatchingMLPConfig
    weights_file: str = "weights.safetensors"
    weights_sha256: str
    config_file: str = "config.json"
    data: Optional[CheckerboardSpec] = None
    origin: str = Field(description="how it came to be, e.g. 'trained by kdm teacher train'")
    training: Optional[TeacherTrainConfig] = None
    final_loss: Optional[float] = None
    code_version: str
    created: str
