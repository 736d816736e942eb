"""The one config of the ``kdm`` flow and of ``kdm distill``: a recipe and its fields.

``KdmConfig`` is a discriminated union on ``recipe``: ``cifar10`` (``DistillImageConfig``: dataset ->
extractor -> EDM teacher -> pairs -> filter -> student -> evaluation) or ``checkerboard``
(``DistillCheckerboardConfig``: flow-matching teacher or imported pairs -> pairs -> filter -> student ->
evaluation). ``preset`` names the recipe's preset that fills every field not set (cifar10: smoke | mini |
full; checkerboard: the YAML presets under ``configs/distill/``). ``StageRequest`` is what the flow sends
to the ``gpu-stage`` deployment: the run's config, the stage's name and its inputs' URIs.

This module is part of the leaf package: pydantic only.
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field

from .common import Strict
from .distill_image import PRESET_NAMES as CIFAR10_PRESETS
from .distill_image import DistillImageConfig
from .stages import DistillCheckerboardConfig

RecipeName = Literal["cifar10", "checkerboard"]
RECIPE_NAMES: tuple[str, ...] = ("cifar10", "checkerboard")
# Presets a deployment parameter may name (the server checks them); checkerboard presets are YAML files
# under configs/distill/, these are the ones shipped.
PresetName = Literal["smoke", "mini", "full", "checkerboard", "checkerboard-import", "checkerboard-multistep",
                     "checkerboard-import-multistep"]
RECIPE_PRESETS: dict[str, tuple[str, ...]] = {"cifar10": CIFAR10_PRESETS,
                                              "checkerboard": ("checkerboard", "checkerboard-import",
                                                               "checkerboard-multistep",
                                                               "checkerboard-import-multistep", "smoke")}
DEFAULT_PRESET = {"cifar10": "full", "checkerboard": "checkerboard"}

KdmConfig = Annotated[Union[DistillImageConfig, DistillCheckerboardConfig], Field(discriminator="recipe")]


class StageRequest(Strict):
    """One stage of one run, as the ``gpu-stage`` flow (pool kdm-gpu) receives it."""

    config: KdmConfig
    stage: str = Field(description="the stage's name in its recipe, e.g. 'student'")
    inputs: dict[str, str] = Field(default_factory=dict, description="upstream stage name -> its output URI")
