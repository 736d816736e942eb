"""Evaluation protocol and report (``report.json`` + plots beside it)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_serializer

from .common import SCHEMA_VERSION, SeedRange, Strict, drop_unset
from .multistep import FrontierConfig
from .pairs import SamplerSettings


class Eval2DConfig(FrontierConfig):
    """Protocol of the 2-D evaluation. n = min(num_samples, held-out pairs, train pairs) points per row:
    the reference R is the first n held-out x_0; the student row uses n one-step samples from seeds
    sample_seed..sample_seed+n-1; the teacher row uses the first n x_0 of the train split (teacher
    samples independent of R). Outlier rates depend on n (fixed DBSCAN eps): compare at equal n.

    The quality-vs-NFE frontier: the student is scored at every NFE of ``nfe`` (None: the NFEs it was trained
    for, 1 for a one-step student) on the same seeds, and, with ``teacher_nfe``, the teacher's own sampler cut
    short to those NFEs (``SamplerSettings.at_nfe``) from the same seeds (its pair MSE is against the full
    teacher's held-out x_0); it needs the teacher network (the recipe's own teacher, or ``kdm evaluate
    --teacher``). Both are left out of the dump when unset."""

    num_samples: int = Field(10_000, ge=20)
    sample_seed: int = Field(1_000_000, ge=0)
    swd_projections: int = Field(512, ge=1)
    swd_seed: int = 0
    dbscan_eps: float = Field(0.15, gt=0)
    dbscan_min_samples: int = Field(5, ge=1)
    zscore_threshold: float = Field(3.0, gt=0)
    plots: bool = True


class MetricSet(Strict):
    in_cell_fraction: float
    swd: float = Field(description="sliced Wasserstein-1 to the teacher's held-out x_0")
    outlier_rate: float
    pair_mse: Optional[float] = Field(None, description="student(x_T) vs teacher x_0 on held-out pairs")
    pair_mse_stderr: Optional[float] = Field(None, description="the pair MSE's standard error over those pairs "
                                                               "(absent in reports written before it existed)")
    num_points: int

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        return drop_unset(handler(self), ("pair_mse_stderr",))


class FrontierPoint(Strict):
    """One point of the quality-vs-NFE frontier: the student at ``nfe`` evaluations, or the teacher's sampler
    cut short to ``nfe`` (``sampler``: its settings then)."""

    model: Literal["student", "teacher"]
    nfe: int = Field(ge=1)
    sampler: Optional[SamplerSettings] = None
    metrics: MetricSet


class EvaluationReport(Strict):
    format: Literal["kdm-evaluation"] = "kdm-evaluation"
    schema_version: int = SCHEMA_VERSION
    kind: Literal["checkerboard-2d"] = "checkerboard-2d"
    student_version: str
    pairs_version: str
    heldout_version: str
    teacher_id: Optional[str] = None
    protocol: Eval2DConfig
    student: MetricSet
    teacher_reference: MetricSet = Field(
        description="the same metrics of the teacher's own x_0 (train split) against the held-out reference")
    sample_seeds: SeedRange
    teacher_nfe: Optional[int] = Field(None, description="NFE of the teacher sampler that made the pairs")
    frontier: list[FrontierPoint] = Field(
        default_factory=list, description="student at each scored NFE, then the teacher cut short (if measured); "
                                          "empty in reports written before the frontier existed")
    plots: dict[str, str] = Field(default_factory=dict, description="name -> file name beside the report")
    code_version: str
    created: str

    def student_at(self, nfe: int) -> MetricSet:
        for p in self.frontier:
            if p.model == "student" and p.nfe == nfe:
                return p.metrics
        if nfe == 1:
            return self.student
        raise KeyError(f"the report has no student row at NFE {nfe}")
