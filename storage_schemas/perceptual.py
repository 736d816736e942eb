"""The pipeline's own perceptual network (training distance ``lpips-own``): recipe, reference, manifest.

The network is a small VGG-style CIFAR classifier (plain 3x3 convolutions with BatchNorm and ReLU,
average pooling, no residual connections) trained by ``pipeline.training.perceptual``. Its multi-layer
feature maps give an LPIPS-style distance for the students' L_rec / L_pred (``models.perceptual``).
It is deliberately *another* network than the evaluation's FD/KID extractor
(``storage_schemas.protocol.ExtractorTrainConfig``: a ResNet-9 with max pooling): another architecture,
another seed (1 here, 0 there) and its own weights, so that a student is never trained on the features
its FD is measured with. ``pipeline.training.perceptual.check_independent`` refuses the pairing when
the two share an id, weights or a training seed.

This module is part of the leaf package: pydantic only.
"""
from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import Field, field_validator

from .common import SCHEMA_VERSION, Strict
from .protocol import ClassifierTrainConfig, ExtractorRef, TrainedClassifierFields

PERCEPTUAL_FORMAT = "kdm-perceptual-net"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class PerceptualNetTrainConfig(ClassifierTrainConfig):
    """Recipe of the perceptual network: VGG-style stages of ``width, 2w, 4w, 8w`` channels, two
    conv-BN-ReLU layers each, 2x2 average pooling between stages, global average pooling and a linear
    classifier (logits * 0.125). The distance taps the last ReLU of each stage (4 maps: 32x32, 16x16,
    8x8, 4x4 at CIFAR resolution). Optimisation as the extractor's (SGD Nesterov, one-cycle learning
    rate, label smoothing, crops + flips, bf16 autocast on CUDA, deterministic given the seed), with a
    narrower net, fewer epochs and another seed. Untuned defaults: measure the test accuracy on the GPU.
    """

    arch: Literal["vgg-avg"] = "vgg-avg"
    width: int = Field(32, ge=1)
    epochs: int = Field(16, ge=1)
    lr: float = Field(0.2, gt=0)
    seed: int = Field(1, description="differs from the evaluation extractor's default seed (0) on purpose")

    @property
    def layer_channels(self) -> tuple[int, ...]:
        w = self.width
        return (w, 2 * w, 4 * w, 8 * w)


class PerceptualStageConfig(Strict):
    """The perceptual-network stage: trained on the dataset's train split (like the extractor stage)."""

    train: PerceptualNetTrainConfig = PerceptualNetTrainConfig()
    train_images: Optional[int] = Field(None, ge=2, description="evenly spaced subset of the train split "
                                                                "(None: all of it)")
    device: Literal["cpu", "cuda"] = Field("cuda", description="where it trains")


class PerceptualNetRef(Strict):
    """The network a student's ``lpips-own`` distance ran on, pinned by the sha256 of its weights file."""

    id: str
    sha256: str

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str) -> str:
        if not _SHA256.fullmatch(v):
            raise ValueError(f"sha256 must be 64 lowercase hex digits, got {v!r}")
        return v


class PerceptualNetManifest(TrainedClassifierFields):
    """``weights.safetensors`` + ``config.json`` + ``manifest.json`` (written last) of a perceptual network."""

    format: Literal["kdm-perceptual-net"] = PERCEPTUAL_FORMAT
    schema_version: int = SCHEMA_VERSION
    id: str = Field(description="'pnet-<arch>w<width>-<hash>', content-addressed over recipe, config, data and seed")
    config: PerceptualNetTrainConfig
    layer_channels: tuple[int, ...]
    independent_of: Optional[ExtractorRef] = Field(
        None, description="the evaluation extractor this network was checked to differ from when it was trained")

    @property
    def version(self) -> str:
        return self.id

    def ref(self) -> PerceptualNetRef:
        return PerceptualNetRef(id=self.id, sha256=self.weights_sha256)
