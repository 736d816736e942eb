"""Artifact manifests read without importing Zarr, NumPy or torch: pair stores and datasets (a Zarr group's
``zarr.json``, attribute ``kdm``), teachers and student runs (``manifest.json``).

Every open of a pair store or dataset reads its manifest here first, so a wrong path, a store that is
not kdm's or an edited manifest fails with one clear message, and the commands check their inputs this
way before the heavy imports (an error exit in a fraction of a second). A Zarr v3 group's metadata is the
JSON document ``<group>/zarr.json``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Type, TypeVar

from pydantic import BaseModel, ValidationError

from pipeline.errors import ArtifactMissing, KDMError
from storage_schemas.common import format_validation_error

M = TypeVar("M", bound=BaseModel)
MANIFEST_KEY = "kdm"       # = storage_schemas.pairs.MANIFEST_KEY (not imported: that loads every schema)


def _read_metadata(url: str) -> bytes | None:
    """The bytes of ``<url>/zarr.json``, or None when there is no such file."""
    url = str(url)
    if "://" not in url or url.startswith("file://"):
        try:
            return Path(url.removeprefix("file://"), "zarr.json").read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
    from pipeline.storage import artifacts
    try:
        return artifacts.read_bytes(artifacts.join(url, "zarr.json"))
    except FileNotFoundError:
        return None


def read_group_manifest(url: str, manifest_model: Type[M], what: str, writer: str = "kdm") -> M:
    """The manifest of the committed kdm Zarr group at ``url`` as ``manifest_model``.

    ``what`` names the artifact kind ('pair store') and ``writer`` the command that writes it, for the
    messages: ArtifactMissing when there is no such group or it has no manifest, KDMError when the
    metadata or the manifest is invalid.
    """
    raw = _read_metadata(url)
    if raw is None:
        raise ArtifactMissing(f"no {what} at {url} (expected a Zarr v3 group written by {writer})")
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KDMError(f"{url}/zarr.json is not valid JSON ({e}): the {what} is damaged; rewrite it with {writer} "
                       f"or restore it from a copy") from None
    if not isinstance(meta, dict) or meta.get("node_type") != "group":
        raise ArtifactMissing(f"no {what} at {url} (its zarr.json is not a Zarr v3 group's; expected a group "
                              f"written by {writer})")
    manifest = (meta.get("attributes") or {}).get(MANIFEST_KEY)
    if manifest is None:
        raise ArtifactMissing(f"{url} is a Zarr group without a kdm manifest: it is incomplete or not a kdm {what}")
    try:
        return manifest_model.model_validate(manifest)
    except ValidationError as e:
        raise KDMError(format_validation_error(e, f"{url} (attribute '{MANIFEST_KEY}')")
                       + f"\nthe manifest was edited or damaged: rewrite the {what} with {writer}") from None


def check_pair_store(url: str):
    """The manifest of the pair store at ``url``, read without Zarr: fails now unless it is valid."""
    from storage_schemas.pairs import PairStoreManifest
    return read_group_manifest(url, PairStoreManifest, "pair store")


def holds_pair_store(out: str, version: str) -> bool:
    """True when ``out`` holds the pair store of this very ``version``, whole (its arrays as recorded); False
    when nothing is there. Another kind of artifact or another version is refused (artifacts.check_target)
    from its manifest alone, before Zarr is imported."""
    from pipeline.storage import artifacts
    if not artifacts.check_target(out, version, check_pair_store):
        return False
    from pipeline.storage.pairstore import PairStore
    PairStore.open(out)
    return True


def check_dataset(url: str):
    """The manifest of the prepared dataset at ``url``, read without Zarr: fails now unless it is valid."""
    from storage_schemas.datasets import DatasetManifest
    return read_group_manifest(url, DatasetManifest, "dataset", writer="kdm dataset prepare")


def read_teacher_manifest(url: str):
    """The manifest of the teacher artifact at ``url``."""
    from storage_schemas import TeacherManifest
    from pipeline.storage import artifacts
    return artifacts.read_model(artifacts.join(url, artifacts.MANIFEST), TeacherManifest)


def read_student_manifest(url: str):
    """The manifest of a finished student run; a clear error for an unfinished run or another artifact."""
    from storage_schemas import StudentManifest
    from pipeline.errors import ArtifactExists
    from pipeline.storage import artifacts
    path = artifacts.join(url, artifacts.MANIFEST)
    try:
        raw = artifacts.read_json(path)
    except FileNotFoundError:
        what = ("an unfinished student run (no manifest.json yet): finish it by rerunning its `kdm train`"
                if artifacts.exists(artifacts.join(url, artifacts.RUN_CONFIG)) else
                "a Zarr store, not a student run" if artifacts.exists(artifacts.join(url, "zarr.json")) else
                "not a student run (no manifest.json)" if artifacts.exists(url) else "missing")
        raise ArtifactMissing(f"{url} is {what}; give the --out directory of a finished `kdm train`") from None
    except ValueError:
        raise KDMError(f"{path} is not valid JSON: the run is damaged; train it again into a new --out") from None
    fmt = raw.get("format") if isinstance(raw, dict) else None
    if fmt != "kdm-student":
        raise ArtifactExists(f"{url} holds another kind of artifact ({fmt or 'unknown'}), not a kdm student run; "
                             f"give the directory of a finished `kdm train`")
    return artifacts.read_model(path, StudentManifest)
