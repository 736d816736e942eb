"""Shared pieces of every on-disk format: strict base model, seed ranges, array specs, code version.

This package is the leaf of the dependency graph: no torch, no zarr, nothing of ours.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SCHEMA_VERSION = 1
PACKAGE_VERSION = "0.1.0"


def drop_unset(out: dict, keys: Iterable[str]) -> dict:
    """``out`` (a model dump) without those of ``keys`` that are None: for a ``model_serializer(mode="wrap")``
    that keeps the records (and versions) written before those fields existed."""
    for key in keys:
        if out.get(key, 0) is None:
            out.pop(key)
    return out


class Strict(BaseModel):
    """Base of every schema: unknown fields are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class SeedRange(Strict):
    """Half-open range of per-sample seeds [start, stop)."""

    start: int
    stop: int

    @model_validator(mode="after")
    def _ordered(self) -> "SeedRange":
        if self.start < 0:
            raise ValueError(f"seed range start must be >= 0, got {self.start}")
        if self.stop <= self.start:
            raise ValueError(f"seed range is empty: start={self.start} stop={self.stop}")
        return self

    @classmethod
    def parse(cls, text: str) -> "SeedRange":
        """Parse 'A-B' (inclusive, as EDM's generate.py) into [A, B+1)."""
        m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", text)
        if not m:
            raise ValueError(f"seed range {text!r} is not of the form START-END (inclusive), e.g. 0-49999")
        a, b = int(m.group(1)), int(m.group(2))
        if b < a:
            raise ValueError(f"seed range {text!r}: END must be >= START")
        return cls(start=a, stop=b + 1)

    def __len__(self) -> int:
        return self.stop - self.start

    def overlaps(self, other: "SeedRange") -> bool:
        return self.start < other.stop and other.start < self.stop

    def text(self) -> str:
        return f"{self.start}-{self.stop - 1}"


class ArraySpec(Strict):
    """Shape, dtype and chunking of one Zarr array."""

    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]
    codecs: tuple[str, ...] = ()


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def code_version() -> str:
    """Package version plus git commit when running from a checkout (KDM_CODE_VERSION overrides)."""
    env = os.environ.get("KDM_CODE_VERSION")
    if env:
        return env
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{PACKAGE_VERSION}+g{sha}" if sha else PACKAGE_VERSION


def recipe_version() -> str:
    """Version of the *semantics* that enter artifact ids: bumped by hand when outputs change.

    Artifact versions hash this, not the git commit, so a docs-only commit does not invalidate
    every stored pair set; the full code version is still recorded in every manifest.
    """
    return f"kdm-recipe-{PACKAGE_VERSION}"


def _canonical(parts: tuple) -> str:
    def norm(p: Any) -> Any:
        if isinstance(p, BaseModel):
            return p.model_dump(mode="json")
        return p
    return json.dumps([norm(p) for p in parts], sort_keys=True, separators=(",", ":"), default=str)


def stable_hash(*parts: Any, length: int = 16) -> str:
    """sha256 over the canonical JSON of the parts (pydantic models dumped in JSON mode)."""
    return hashlib.sha256(_canonical(parts).encode()).hexdigest()[:length]


class VersionInputs(Strict):
    """What a content-addressed version hashes: ``version == f"{prefix}-{stable_hash(*parts)}"``.

    Recorded in a manifest beside its version, so that a reader recomputes the version (a hand-edited
    version, or inputs edited without it, are refused) and a user sees what the version stands for.
    ``parts`` are the hashed values in canonical JSON (pydantic models dumped in JSON mode).
    """

    prefix: str = Field(pattern=r"^[a-z][a-z0-9-]*$")
    parts: list[Any]

    @classmethod
    def of(cls, prefix: str, *parts: Any) -> "VersionInputs":
        return cls(prefix=prefix, parts=json.loads(_canonical(parts)))

    @property
    def version(self) -> str:
        return f"{self.prefix}-{stable_hash(*self.parts)}"

    def check(self, version: str, suffix: str = "", **named) -> None:
        """Raise ValueError unless ``version`` is what these inputs hash to (plus ``suffix``) and each
        ``named`` value (e.g. ``pairs_version=...``; None: not checked) is among the hashed inputs."""
        expect = self.version + suffix
        if version != expect:
            raise ValueError(f"version {version} is not the hash of its recorded inputs ({expect})")
        for what, value in named.items():
            if value is not None and not self.mentions(value):
                raise ValueError(f"{what.replace('_', ' ')} {value} is not among the inputs its version {version} "
                                 f"hashes")

    def mentions(self, value: str) -> bool:
        """True when ``value`` is one of the hashed strings (at any depth)."""
        def walk(p: Any) -> bool:
            if isinstance(p, dict):
                return any(walk(v) for v in p.values())
            if isinstance(p, list):
                return any(walk(v) for v in p)
            return p == value
        return walk(self.parts)


def format_validation_error(err: ValidationError, source: str = "") -> str:
    """One readable line per problem, each naming the field path; a single problem fits on one line. Inputs
    are echoed only when short (a model-level check would otherwise echo a whole config or manifest)."""
    items = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(root)"
        if e["type"] == "missing":
            items.append(f"{loc}: field required")
            continue
        msg = "unknown field (check the spelling)" if e["type"] == "extra_forbidden" else e["msg"]
        msg = msg.removeprefix("Value error, ")
        got = repr(e.get("input"))
        items.append(f"{loc}: {msg}" + (f" (got {got})" if len(got) <= 80 else ""))
    where = f" in {source}" if source else ""
    if len(items) == 1:
        return f"invalid {err.title}{where}: {items[0]}"
    return "\n".join([f"invalid {err.title}{where}:"] + [f"  - {i}" for i in items])


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` merged into a copy of ``base``: mappings merge key by key at every depth, anything else replaces."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out
