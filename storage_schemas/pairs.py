"""Pair-store format: a Zarr v3 group with arrays x_T, x_0, label, seed at its root.

The manifest below is stored in the group attributes under the key ``kdm``; a held-out split lives in
the child group ``heldout`` with the same layout and its own manifest.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_serializer, model_validator

from .common import SCHEMA_VERSION, ArraySpec, SeedRange, Strict, VersionInputs

PAIR_ARRAYS = ("x_T", "x_0", "label", "seed")
MANIFEST_KEY = "kdm"
HELDOUT_GROUP = "heldout"


class SamplerSettings(Strict):
    """Sampler used to integrate the teacher from x_T to x_0.

    ``flow-matching-ode``: fixed-step ODE solver (method, steps) from t=0 (noise) to t=1 (data).
    ``edm-heun``: EDM's deterministic Heun sampler (generate.py, S_churn=0) with ``steps`` noise levels
    from ``noise_scale`` (= sigma_max, x_T = sigma_max * eps) down to ``sigma_min`` with exponent ``rho``,
    then 0; NFE = 2 * steps - 1. Defaults: 18 steps, sigma_min 0.002, sigma_max 80, rho 7.
    ``sigma_min`` and ``rho`` exist only for edm-heun (and are left out of the dump otherwise).
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
        return self

    @model_serializer(mode="wrap")
    def _drop_unset_edm_fields(self, handler):
        out = handler(self)
        for key in ("sigma_min", "rho", "precision"):
            if out.get(key, 0) is None:
                out.pop(key)
        return out

    @property
    def nfe(self) -> int:
        if self.kind == "edm-heun":
            return 2 * self.steps - 1
        return self.steps * (1 if self.method == "euler" else 2)


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
        out = handler(self)
        for key in ("order", "x_T_multiplier"):
            if out.get(key, 0) is None:
                out.pop(key)
        return out


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
        out = handler(self)
        for key in ("chunk_digests", "heldout", "version_inputs"):
            if out.get(key, 0) is None:
                out.pop(key)
        return out

    @model_validator(mode="after")
    def _consistent(self) -> "PairStoreManifest":
        missing = [a for a in PAIR_ARRAYS if a not in self.arrays]
        if missing:
            raise ValueError(f"arrays is missing {missing}")
        for name in ("x_T", "x_0"):
            shape = self.arrays[name].shape
            if tuple(shape) != (self.count, *self.sample_shape):
                raise ValueError(f"arrays.{name}.shape {shape} != (count, *sample_shape) = "
                                 f"{(self.count, *self.sample_shape)}")
        if self.schema_version > SCHEMA_VERSION:
            raise ValueError(f"schema_version {self.schema_version} is newer than this kdm reads "
                             f"({SCHEMA_VERSION}): upgrade kdm, or the manifest was edited")
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
