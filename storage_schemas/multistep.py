"""What the configs and manifests of multi-step students share (``models.multistep``): the checks of the NFE
lists, the fields dropped from dumps while unset (so that one-step versions stay what they were), and the grid a
finished run samples on. Part of the leaf package: pydantic only."""
from __future__ import annotations

from typing import Iterable, Optional

from pydantic import Field, model_serializer, model_validator

from .common import Strict, drop_unset


def nfe_list_problem(name: str, v: Optional[Iterable[int]], first: Optional[int] = None) -> Optional[str]:
    """What is wrong with the NFE list ``v`` of field ``name`` (None: nothing): increasing NFEs >= 1, starting at
    ``first`` when given."""
    if v is None:
        return None
    v = list(v)
    if not v or v != sorted(set(v)) or v[0] < 1 or (first is not None and v[0] != first):
        start = f"starting at {first}" if first is not None else ">= 1"
        return f"{name} {v} must list increasing NFEs {start}" + (", e.g. [1, 2, 4]" if first == 1 else "")
    return None


# The multi-step fields of a student model config (left out of its dump when unset: one-step versions stay).
MULTISTEP_FIELDS = ("nfe_train", "trajectory_rows", "trajectory_output", "anchor_rho", "trajectory_every")
TRAJECTORY_OUTPUT_DOC = ("multi-step student: also train every segment's decoded push against the teacher state "
                         "where it ends (segments that end at x_0 through the one-step decoder as a fixed "
                         "function; models.multistep); None or false: off")
ANCHOR_RHO_DOC = ("multi-step student: where its m-evaluation samples re-anchor, a_k = floor(n (1 - (1 - k/m)^rho) "
                  "+ 1/2) on the grid of n intervals (models.multistep); None or 1: evenly spaced, > 1: toward x_0 "
                  "(n = 9, m = 2: the anchor at 5 for rho 1, 7 for 2, 8 for 3)")
TRAJECTORY_EVERY_DOC = ("multi-step student: the trajectory terms train on every k-th step only (the last of every "
                        "k: 0-based steps k - 1, 2k - 1, ..., so a log interval or run of a multiple of k steps ends "
                        "with one); "
                        "the other steps are the one-step student's, so the one-step networks train exactly as "
                        "the one-step student's and a step costs about 1 + (c - 1) / k of its (c: the cost of a "
                        "step with the terms); None or 1: every step")


def trains_trajectory(trajectory_every: Optional[int], step: int) -> bool:
    """Whether (0-based) ``step`` of a multi-step student trains its trajectory terms (``trajectory_every`` = k:
    the last step of every k)."""
    return (step + 1) % (trajectory_every or 1) == 0


def nfe_train_problem(cfg) -> Optional[str]:
    """The checks of a student model config's multi-step fields: ``nfe_train`` (1 is always trained), and the
    settings of multi-step students (``trajectory_rows``, ``trajectory_output``, ``anchor_rho``,
    ``trajectory_every``), which need it."""
    problem = nfe_list_problem("nfe_train", cfg.nfe_train, first=1)
    if problem:
        return problem + " (the one-step map is always trained)"
    for name in (f for f in MULTISTEP_FIELDS if f != "nfe_train"):
        if getattr(cfg, name) is not None and cfg.nfe_train is None:
            return f"{name} is a setting of multi-step students (set nfe_train)"
    return None


class MultiStepRun:
    """Mixin of a student run's manifest with ``snapshots`` (of its pairs, None for one-step students) and
    ``model.nfe_train``: the grid it samples on and the NFEs it samples with."""

    @property
    def intervals(self) -> int:
        """Intervals of its trajectory grid (1: a one-step student)."""
        return self.snapshots.count + 1 if self.snapshots is not None else 1

    @property
    def nfe_trained(self) -> tuple[int, ...]:
        return tuple(self.model.nfe_train) if self.model.nfe_train else (1,)


class FrontierConfig(Strict):
    """The quality-vs-NFE fields of an evaluation config (2-D and image): the student's NFEs scored and the NFEs
    the teacher's own sampler is cut short to; left out of the dump when unset (earlier versions stay)."""

    nfe: Optional[tuple[int, ...]] = Field(None, description="student NFEs scored (None: the ones it was trained for)")
    teacher_nfe: Optional[tuple[int, ...]] = Field(
        None, description="the teacher's sampler cut short to these NFEs (None: not measured)")

    @model_validator(mode="after")
    def _nfes(self):
        for name in ("nfe", "teacher_nfe"):
            problem = nfe_list_problem(name, getattr(self, name))
            if problem:
                raise ValueError(problem)
        return self

    @model_serializer(mode="wrap")
    def _drop_unset_nfes(self, handler):
        return drop_unset(handler(self), ("nfe", "teacher_nfe"))
