"""Pair-store format: a Zarr v3 group with arrays x_T, x_0, label, seed at its root.

The manifest below is stored in the group attributes under the key ``kdm``; a held-out split lives in
the child group ``heldout`` with the same layout and its own manifest.

A trajectory store also keeps K intermediate states of each teacher trajectory: the array ``x_t``
(float32, (N, K, *sample_shape), chunked along N like the others), described by the manifest's
``snapshots`` (K, what the levels are and their values, in sampling order from x_T to x_0). Such a
store is written with schema version 2; stores without snapshots are still written (and read) as
version 1.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_serializer, model_validator

from .common import SCHEMA_VERSION, ArraySpec, SeedRange, Strict, VersionInputs, drop_unset

PAIR_ARRAYS = ("x_T", "x_0", "label", "seed")
SNAPSHOT_ARRAY = "x_t"
MANIFEST_KEY = "kdm"
HELDOUT_GROUP = "heldout"
PAIR_SCHEMA_VERSION = 2        # what this kdm writes for a store with snapshots (1: without) and reads at most
LEVEL_AXES = {"flow-matching-time": (0.0, 1.0), "edm-sigma": (None, 0.0)}   # axis -> (x_T level, x_0 level)


def store_arrays(snapshots: bool) -> tuple[str, ...]:
    """The arrays of a pair store (before a filter's ``source_index``): PAIR_ARRAYS, then ``x_t`` with snapshots."""
    return PAIR_ARRAYS + ((SNAPSHOT_ARRAY,) if snapshots else ())


class SamplerSettings(Strict):
    """Sampler used to integrate the teacher from x_T to x_0.

    ``flow-matching-ode``: fixed-step ODE solver (method, steps) from t=0 (noise) to t=1 (data).
    ``edm-heun``: EDM's deterministic Heun sampler (generate.py, S_churn=0) with ``steps`` noise levels
    from ``noise_scale`` (= sigma_max, x_T = sigma_max * eps) down to ``sigma_min`` with exponent ``rho``,
    then 0; NFE = 2 * steps - 1. Defaults: 18 steps, sigma_min 0.002, sigma_max 80, rho 7.
    ``sigma_min`` and ``rho`` exist only for edm-heun (and are left out of the dump otherwise).
    ``snapshot_steps`` (either kind): the states after these many steps of the sampler (increasing, each in
    [1, steps - 1]) are kept as the store's trajectory snapshots (``x_t``); left out of the dump when unset.
    """

    kind: Literal["flow-matching-ode", "edm-heun"] = "flow-matching-ode"
    method: Literal["euler", "midpoint", "heun"] = "midpoint"
    steps: int = Field(20, ge=1, le=10_000)
    noise_scale: float = Field(1.0, gt=0, description="x_T = noise_scale * eps, eps ~ N(0, I) per seed")
    sigma_min: Optional[float] = Field(None, gt=0, description="edm-heun: smallest noise level")
    rho: Optional[float] = Field(None, gt=0, description="edm-heun: time-step exponent")
    precision: Optional[Literal["fp32", "bf16", "fp16"]] = Field(
        None, description="edm-heun: None/'fp32' = EDM's generate.py (float32 network, float64 Heun state); "
                          "'bf16'/'fp16' = the fast path (reduced-precision autocast network, float32 state)")
    snapshot_steps: Optional[tuple[int, ...]] = Field(
        None, description="keep the states after these sampler steps as trajectory snapshots (array x_t)")

    @model_validator(mode="before")
    @classmethod
    def _edm_defaults(cls, data):
        if isinstance(data, dict) and data.get("kind") == "edm-heun":
            data = {"method": "heun", "steps": 18, "noise_scale": 80.0, "sigma_min": 0.002, "rho": 7.0, **data}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "SamplerSettings":
        if self.kind == "edm-heun":
            if self.method != "heun":
                raise ValueError(f"sampler kind 'edm-heun' is Heun's method; method={self.method!r} is not valid")
            if self.steps < 2:
                raise ValueError("edm-heun needs steps >= 2")
            if self.sigma_min >= self.noise_scale:
                raise ValueError(f"sigma_min {self.sigma_min} must be below noise_scale (sigma_max) {self.noise_scale}")
        elif self.sigma_min is not None or self.rho is not None or self.precision is not None:
            raise ValueError("sigma_min, rho and precision are settings of kind 'edm-heun' only")
        snaps = self.snapshot_steps
        if snaps is not None and (not snaps or list(snaps) != sorted(set(snaps))
                                  or any(not 1 <= k < self.steps for k in snaps)):
            raise ValueError(f"snapshot_steps {list(snaps)} must be increasing step numbers in [1, {self.steps - 1}] "
                             f"(the state after that many of the {self.steps} steps)")
        return self

    @staticmethod
    def even_snapshots(steps: int, count: int) -> tuple[int, ...]:
        """K = ``count`` step numbers spread evenly over a sampler of ``steps`` steps: round(i steps / (K + 1))."""
        if not 1 <= count < steps:
            raise ValueError(f"{count} snapshots do not fit between the {steps} steps of the sampler "
                             f"(at most {steps - 1})")
        return tuple((2 * i * steps + count + 1) // (2 * (count + 1)) for i in range(1, count + 1))

    @model_serializer(mode="wrap")
    def _drop_unset_edm_fields(self, handler):
        return drop_unset(handler(self), ("sigma_min", "rho", "precision", "snapshot_steps"))

    @property
    def nfe(self) -> int:
        if self.kind == "edm-heun":
            return 2 * self.steps - 1
        return self.steps * (1 if self.method == "euler" else 2)

    def at_nfe(self, nfe: int) -> "SamplerSettings":
        """This sampler cut short to ``nfe`` network evaluations (no snapshots): EDM Heun with (nfe + 1) / 2
        steps (nfe odd, >= 3: 3, 5, 9, 17, 35); a flow-matching solver keeps its method when nfe is a multiple of
        its evaluations per step (midpoint, Heun: 2) and is Euler with nfe steps otherwise."""
        if self.kind == "edm-heun":
            if nfe < 3 or nfe % 2 == 0:
                raise ValueError(f"EDM Heun makes 2 steps - 1 evaluations: an odd NFE >= 3, not {nfe}")
            return self.model_copy(update={"steps": (nfe + 1) // 2, "snapshot_steps": None})
        per = 1 if self.method == "euler" else 2
        if nfe % per == 0:
            return self.model_copy(update={"steps": nfe // per, "snapshot_steps": None})
        return self.model_copy(update={"method": "euler", "steps": nfe, "snapshot_steps": None})

    def describe(self) -> str:
        """e.g. 'midpoint 20 steps (40 NFE)' or 'EDM Heun 18 steps (35 NFE)'."""
        name = "EDM Heun" if self.kind == "edm-heun" else self.method
        return f"{name} {self.steps} step{'s' if self.steps != 1 else ''} ({self.nfe} NFE)"


class Snapshots(Strict):
    """K intermediate states of every trajectory, kept in array ``x_t`` (N, K, *sample_shape).

    ``axis`` says what a level is: ``flow-matching-time`` t (x_T at t = 0, x_0 at t = 1: levels increase)
    or ``edm-sigma`` the EDM noise level (x_T at sigma_max = the store's ``x_T_level``, x_0 at 0: levels
    decrease). ``levels`` are in sampling order, strictly between the levels of x_T and x_0.
    ``solver_steps`` (generated stores): after which steps of the teacher's sampler each state was taken;
    ``source_index`` (imported stores): which entries of the source trajectory they are.
    """

    count: int = Field(ge=1, description="K")
    axis: Literal["flow-matching-time", "edm-sigma"]
    x_T_level: float = Field(description="level of x_T: t = 0 (flow matching) or sigma_max (EDM)")
    levels: tuple[float, ...]
    solver_steps: Optional[tuple[int, ...]] = None
    source_index: Optional[tuple[int, ...]] = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        return drop_unset(handler(self), ("solver_steps", "source_index"))

    @model_validator(mode="after")
    def _consistent(self) -> "Snapshots":
        lo, hi = self.x_T_level, self.x_0_level
        if len(self.levels) != self.count:
            raise ValueError(f"snapshots: {len(self.levels)} levels for count {self.count}")
        for name in ("solver_steps", "source_index"):
            v = getattr(self, name)
            if v is not None and (len(v) != self.count or list(v) != sorted(set(v))):
                raise ValueError(f"snapshots.{name} {list(v)} must hold {self.count} increasing values")
        want = LEVEL_AXES[self.axis][0]
        if want is not None and lo != want:
            raise ValueError(f"snapshots on axis {self.axis} start at x_T level {want}, got {lo}")
        path = [lo, *self.levels, hi]
        sign = 1.0 if hi > lo else -1.0
        if any(sign * (b - a) <= 0 for a, b in zip(path[:-1], path[1:])):
            raise ValueError(f"snapshots.levels {list(self.levels)} must run strictly from the x_T level {lo} "
                             f"towards the x_0 level {hi} ({self.axis}), in sampling order")
        return self

    @property
    def x_0_level(self) -> float:
        return LEVEL_AXES[self.axis][1]


class TeacherRef(Strict):
    id: str
    sha256: str
    kind: str


class ImportInfo(Strict):
    format: Literal["kdm-trajectories", "kdm-npz", "get-pt", "npz"]
    source_uri: str
    source_sha256: str
    holdout_fraction: float = Field(ge=0.0, lt=1.0)
    split_seed: int
    order: Optional[Literal["xT-first", "x0-first"]] = Field(None, description="kdm-npz: index order of arr_0/endpoints")
    x_T_multiplier: Optional[float] = Field(None, description="factor applied to the source's x_T on import (get-pt: 80)")

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        return drop_unset(handler(self), ("order", "x_T_multiplier"))


class FilterRecord(Strict):
    source_version: str
    source_content_hash: str
    config_hash: str
    counts: dict[str, int] = Field(description="dropped pairs per reason; 'kept' is the survivors")
    kept_index_array: str = "source_index"


class HeldoutRef(Strict):
    """The held-out split a train-split manifest expects in its child group ``heldout``."""

    version: str
    count: int = Field(ge=0)
    content_hash: str


class PairStoreManifest(Strict):
    format: Literal["kdm-pairs"] = "kdm-pairs"
    schema_version: int = SCHEMA_VERSION
    version: str = Field(min_length=8, description="content-addressed id of inputs + config + recipe")
    version_inputs: Optional[VersionInputs] = Field(
        None, description="what the version hashes (the held-out split's version adds '-heldout'); the version "
                          "is recomputed from it on every read. Absent in stores written before it existed")
    split: Literal["train", "heldout"]
    origin: Literal["teacher", "import", "filter"]
    count: int = Field(ge=0)
    sample_shape: tuple[int, ...]
    arrays: dict[str, ArraySpec]
    chunk_size: int = Field(ge=1)
    seeds: Optional[SeedRange] = None
    teacher: Optional[TeacherRef] = None
    sampler: Optional[SamplerSettings] = None
    x_T_scale: float = Field(1.0, gt=0, description="x_T = x_T_scale * eps with eps ~ N(0, I)")
    num_classes: int = Field(0, ge=0, description="0 = unconditional (label == -1)")
    import_info: Optional[ImportInfo] = None
    filter: Optional[FilterRecord] = None
    snapshots: Optional[Snapshots] = Field(
        None, description="intermediate trajectory states kept in array x_t (schema version 2); None: pairs only")
    content_hash: str = Field(description="sha256 over the raw bytes of every array, in PAIR_ARRAYS order")
    chunk_digests: Optional[dict[str, list[str]]] = Field(
        None, description="per array, the sha256 of each chunk's rows (raw little-endian bytes, the rows of "
                          "that chunk only), in chunk order; checked by every read. Absent in stores written "
                          "before it existed (readers then check that each chunk is present)")
    heldout: Optional[HeldoutRef] = Field(None, description="train split: the held-out child it was committed with")
    code_version: str
    created: str

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        return drop_unset(handler(self), ("chunk_digests", "heldout", "version_inputs", "snapshots"))

    @model_validator(mode="after")
    def _consistent(self) -> "PairStoreManifest":
        self._check_snapshots()
        missing = [a for a in PAIR_ARRAYS if a not in self.arrays]
        if missing:
            raise ValueError(f"arrays is missing {missing}")
        for name in ("x_T", "x_0"):
            shape = self.arrays[name].shape
            if tuple(shape) != (self.count, *self.sample_shape):
                raise ValueError(f"arrays.{name}.shape {shape} != (count, *sample_shape) = "
                                 f"{(self.count, *self.sample_shape)}")
        if self.schema_version > PAIR_SCHEMA_VERSION:
            raise ValueError(f"schema_version {self.schema_version} is newer than this kdm reads "
                             f"({PAIR_SCHEMA_VERSION}): upgrade kdm, or the manifest was edited")
        if self.chunk_digests is not None:
            if set(self.chunk_digests) != set(self.arrays):
                raise ValueError(f"chunk_digests covers {sorted(self.chunk_digests)}, arrays are {sorted(self.arrays)}")
            for name, digests in self.chunk_digests.items():
                spec = self.arrays[name]
                rows = spec.chunks[0] if spec.chunks else 1
                expect = -(-spec.shape[0] // max(rows, 1)) if spec.shape else 1
                if len(digests) != expect:
                    raise ValueError(f"chunk_digests.{name} has {len(digests)} entries, the array has {expect} chunks")
        if self.split == "heldout" and self.heldout is not None:
            raise ValueError("a held-out split has no held-out child")
        if self.origin == "teacher" and (self.teacher is None or self.sampler is None):
            raise ValueError("a teacher-origin store must record teacher and sampler")
        if self.origin == "import" and self.import_info is None:
            raise ValueError("an import-origin store must record import_info")
        if self.origin == "filter" and self.filter is None:
            raise ValueError("a filter-origin store must record filter")
        self._check_version()
        return self

    def _check_snapshots(self) -> None:
        spec = self.arrays.get(SNAPSHOT_ARRAY)
        if self.snapshots is None:
            if spec is not None:
                raise ValueError(f"array {SNAPSHOT_ARRAY} is present but the manifest records no snapshots")
            return
        if self.schema_version < 2:
            raise ValueError(f"a store with snapshots has schema_version >= 2, got {self.schema_version}")
        want = (self.count, self.snapshots.count, *self.sample_shape)
        if spec is None:
            raise ValueError(f"the manifest records {self.snapshots.count} snapshots but array {SNAPSHOT_ARRAY} "
                             f"is missing")
        if tuple(spec.shape) != want:
            raise ValueError(f"arrays.{SNAPSHOT_ARRAY}.shape {tuple(spec.shape)} != (count, K, *sample_shape) = {want}")

    def _check_version(self) -> None:
        """The version is what the recorded inputs hash to, names the teacher / source it records, and
        matches the held-out split committed with it."""
        if self.version_inputs is not None:
            what, value = {"teacher": ("teacher", self.teacher.id if self.teacher else None),
                           "import": ("import_source", self.import_info.source_sha256 if self.import_info else None),
                           "filter": ("filter_source", self.filter.source_version if self.filter else None)
                           }[self.origin]
            self.version_inputs.check(self.version, "-heldout" if self.split == "heldout" else "", **{what: value})
        # a filtered store keeps its source's held-out split (and version); others commit their own
        if (self.heldout is not None and self.origin != "filter"
                and self.heldout.version != f"{self.version}-heldout"):
            raise ValueError(f"version {self.version} does not match its held-out split's {self.heldout.version}")
