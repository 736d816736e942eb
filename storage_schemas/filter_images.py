"""Config of the image filter stage (``pipeline.pairs.filter_images``): privacy filter and dedup of image pairs.

Distances are RMS pixel differences in [0, 1] units (x_0 in [-1, 1] is mapped to (x_0 + 1) / 2), after
the optional per-image normalisation, over the central ``(H - 2 s) x (W - 2 s)`` crop of the reference
image (s = ``max_shift``) against the same-size window of the query moved by up to ``s`` pixels in each
direction, with and without a horizontal flip; the distance of a pair of images is the minimum over
those ``(2 s + 1)^2 x (1 + flip)`` alignments.

Flag rules (``rule``), for a generated x_0 with nearest training distances d1 <= d2 <= ... <= dk:

* ``carlini``: d1 / mean(d1..dk) < ``ratio_threshold`` (Carlini et al. 2023's calibrated distance,
  k = ``neighbours``, 50 in the paper);
* ``gu``: d1 / d2 < ``ratio_threshold`` (Gu et al. 2023 use 1/3);
* ``absolute``: d1 < ``absolute_threshold``, or, when that is unset, below the ``absolute_quantile``
  point of the dataset's own test -> train nearest-neighbour distances (calibrated per run).

The same copy test drops ``blocklist`` matches and ``near_duplicate`` pairs, with the distance to the
nearest blocklist image / earlier kept pair in place of d1 and the pair's training neighbourhood as the
scale (carlini: mean(d1..dk); gu: d1 of the training set; absolute: the absolute threshold).

This module is part of the leaf package: pydantic only.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from .common import Strict

IMAGE_FILTER_REASONS = ("nonfinite", "duplicate_seed", "exact_duplicate", "memorised", "blocklist",
                        "near_duplicate")
DESCRIPTORS = ("pool8-v1",)


class ImageFilterConfig(Strict):
    """Settings of the image filter (defaults: the CIFAR-10 recipe)."""

    drop_nonfinite: bool = Field(True, description="drop pairs with NaN/Inf in x_T or x_0")
    dedup_seeds: bool = Field(True, description="drop a pair whose seed an earlier surviving pair has")
    exact_duplicates: bool = Field(True, description="drop a pair whose x_0 bytes or x_T bytes equal an earlier one's")
    memorisation: bool = Field(True, description="drop copies of training images (needs the teacher's dataset)")
    near_duplicates: bool = Field(True, description="drop copies of earlier kept pairs (the first of a group is kept)")
    rule: Literal["carlini", "gu", "absolute"] = Field("carlini", description="how a copy is flagged (module doc)")
    ratio_threshold: float = Field(1 / 3, gt=0, lt=1, description="carlini / gu: flag when the ratio is below this")
    neighbours: int = Field(50, ge=2, le=1024, description="carlini: k of the mean over the k nearest training images")
    absolute_threshold: Optional[float] = Field(
        None, gt=0, le=1, description="absolute: RMS distance in [0, 1] units; None = calibrate on the test split")
    absolute_quantile: float = Field(0.001, gt=0, lt=0.5,
                                     description="absolute: quantile of test -> train nearest distances used as threshold")
    max_shift: int = Field(2, ge=0, le=8, description="pixels of shift searched in each direction")
    flip: bool = Field(True, description="also search the horizontally flipped image")
    normalise: Literal["none", "mean", "mean-std"] = Field(
        "mean", description="per-image normalisation before comparing: subtract the mean (brightness), and divide by "
                            "the standard deviation (contrast)")
    descriptor: Literal["pool8-v1"] = Field(
        "pool8-v1", description="candidate descriptor version: overlapping average pooling to an 8x8 grid")
    candidates: int = Field(64, ge=0, le=4096,
                            description="training images per query proposed by the descriptor and checked exactly "
                                        "over every shift/flip; 0 = exhaustive exact search (GPU)")
    calibration_samples: int = Field(10_000, ge=0,
                                     description="test images searched against train for calibration and the report")
    blocklist_uri: Optional[str] = Field(None, description="images a pair must not copy: .npy/.npz (N, C, H, W) "
                                                           "or a folder of image files")
    chunk_size: int = Field(4096, ge=1, description="pairs read and searched per step")
    device: str = Field("cpu", description="cpu | cuda")
    grid_size: int = Field(64, ge=0, le=1024, description="closest generated -> training matches drawn in the grid")

    @model_validator(mode="after")
    def _consistent(self) -> "ImageFilterConfig":
        if self.rule == "carlini" and 0 < self.candidates < self.neighbours:
            raise ValueError(f"candidates ({self.candidates}) must be 0 (exhaustive) or >= neighbours "
                             f"({self.neighbours}) for rule 'carlini'")
        if self.rule == "gu" and self.candidates == 1:
            raise ValueError("candidates must be 0 (exhaustive) or >= 2 for rule 'gu'")
        return self

    def version_fields(self) -> dict:
        """The fields that change which pairs are dropped (device and chunk size do not)."""
        return self.model_dump(mode="json", exclude={"device", "chunk_size", "grid_size"})
