"""Teacher registry: register teachers under an artifact root, list them, find those without a student.

``register_teacher`` checks what it is given and writes one immutable record
(storage_schemas.registry.RegisteredTeacher) at ``<root>/registry/teachers/<id>.json``:

* ``kdm`` / ``flow-matching``: a kdm teacher artifact (pipeline.teachers.flow_matching); its manifest is read and its
  weights file is hashed and compared with the manifest (and with ``sha256`` when given). ``kdm`` is an
  EDM denoiser artifact, ``flow-matching`` a flow-matching velocity network artifact.
* ``edm-pkl``: a released EDM network pickle. ``sha256`` is required (the pin); the file's digest must
  equal it. The pickle is then imported (pipeline.teachers.edm_pickle, restricted unpickler, its embedded code is
  never run) to ``<root>/teachers/<edm teacher id>``: the pinned registration is the opt-in that
  ``kdm teacher import-edm --allow-pickle --sha256`` asks for.

Registering the same teacher again (same kind and sha256) is a no-op that returns the existing record.
Nothing here needs Prefect; pipeline.teachers.events emits the ``kdm.teacher.registered`` event.

``pending_teachers`` lists registered teachers that have no finished student under the current recipe
version: for each it builds the config a distillation would run with and asks a planner (by default
``pipeline.stages.plan`` of the cifar10 recipe) whether every stage's output already exists.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from pydantic import BaseModel, ValidationError

from storage_schemas import TeacherManifest, code_version, format_validation_error, stable_hash, utc_now
from storage_schemas.registry import (KIND_PREFIX, TEACHER_KINDS, RegisteredTeacher, record_path,
                                      registry_path)

from pipeline.storage import artifacts
from pipeline.errors import KDMError

HEX = frozenset("0123456789abcdef")
# What a planner returns for a config: per stage a dict with (at least) 'exists'.
Planner = Callable[[Any], dict]


def absolute_uri(uri: str) -> str:
    """Local paths as absolute paths (records and events are read by workers in other directories)."""
    uri = str(uri)
    if artifacts.is_local(uri):
        return str(Path(uri.removeprefix("file://")).expanduser().resolve())
    return uri.rstrip("/")


def registry_id(kind: str, sha256: str) -> str:
    return f"{KIND_PREFIX[kind]}-{stable_hash('kdm-registered-teacher', kind, sha256)}"


def _check_sha(sha256: Optional[str]) -> Optional[str]:
    if sha256 is None:
        return None
    s = sha256.strip().lower()
    if len(s) != 64 or not set(s) <= HEX:
        raise KDMError(f"--sha256 {sha256!r} is not a sha256 digest (64 hex digits)")
    return s


def detect_kind(uri: str) -> str:
    """``kdm`` / ``flow-matching`` for a directory with a kdm teacher manifest, ``edm-pkl`` for a .pkl file."""
    if artifacts.exists(artifacts.join(uri, artifacts.MANIFEST)):
        from pipeline.storage.manifests import read_teacher_manifest
        return "flow-matching" if read_teacher_manifest(uri).kind == "flow-matching-mlp" else "kdm"
    if str(uri).lower().endswith(".pkl"):
        return "edm-pkl"
    raise KDMError(f"cannot tell what {uri} is (no {artifacts.MANIFEST} of a kdm teacher artifact, not a .pkl "
                   f"file); pass --kind {' | '.join(TEACHER_KINDS)}")


def read_record(root: str, teacher_id: str) -> RegisteredTeacher:
    return artifacts.read_model(record_path(root, teacher_id), RegisteredTeacher)


def list_teachers(root: str) -> list[RegisteredTeacher]:
    """Every registered teacher under ``root``, oldest registration first."""
    reg = registry_path(root)
    fs, path = artifacts.url_to_fs(reg)
    if not artifacts.is_local(reg):
        fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False) if str(p).endswith(".json"))
    records = [read_record(root, n[:-len(".json")]) for n in names]
    return sorted(records, key=lambda r: (r.registered_at, r.id))


def _write_once(url: str, data: bytes) -> bool:
    """Write ``data`` at ``url`` unless a file is there; True when this call wrote it.

    Local: written to a temporary name and hard-linked into place (atomic, refuses to replace). Object
    stores: one PUT, which is atomic per object; two concurrent first registrations of the same teacher
    may both write, and the later record (same id, same content but the time) wins.
    """
    if artifacts.is_local(url):
        dst = artifacts.local_path(url)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(data)
        try:
            os.link(tmp, dst)
        except FileExistsError:
            return False
        finally:
            tmp.unlink()
        return True
    if artifacts.exists(url):
        return False
    artifacts.write_bytes(url, data)
    return True


@dataclass(frozen=True)
class Registration:
    record: RegisteredTeacher
    created: bool   # False: the teacher was registered before (nothing written)


def _artifact_facts(teacher_uri: str, kind: str, sha256: Optional[str]) -> tuple[TeacherManifest, str]:
    """The manifest of a kdm teacher artifact and its verified weights sha256."""
    from pipeline.storage.manifests import read_teacher_manifest
    if not artifacts.exists(artifacts.join(teacher_uri, artifacts.MANIFEST)):
        raise KDMError(f"{teacher_uri} is not a kdm teacher artifact (no {artifacts.MANIFEST}); a released EDM "
                       f"network pickle is registered with --kind edm-pkl --sha256 HEX")
    m = read_teacher_manifest(teacher_uri)
    want = "flow-matching-mlp" if kind == "flow-matching" else "edm"
    if m.kind != want:
        other = "flow-matching" if m.kind == "flow-matching-mlp" else "kdm"
        raise KDMError(f"{teacher_uri} is a {m.kind} teacher, not what --kind {kind} registers; register it with "
                       f"--kind {other}")
    actual = weights_sha256(teacher_uri, m, "the teacher's weights are corrupt or were modified; refusing to "
                                            "register it")
    if sha256 and sha256 != actual:
        raise KDMError(f"sha256 mismatch for {teacher_uri}: you pinned {sha256}, but its weights "
                       f"({m.weights_file}) have sha256 {actual}; this is not the teacher you meant")
    return m, actual


def register_teacher(root: str, uri: str, kind: Optional[str] = None, sha256: Optional[str] = None,
                     source: Optional[str] = None) -> Registration:
    """Register the teacher at ``uri`` under ``root`` (see the module docstring); idempotent."""
    if kind is not None and kind not in TEACHER_KINDS:
        raise KDMError(f"unknown teacher kind {kind!r}; use one of {', '.join(TEACHER_KINDS)}")
    sha256 = _check_sha(sha256)
    root = absolute_uri(root)
    uri = absolute_uri(uri)
    if not artifacts.exists(uri):
        raise KDMError(f"{uri} does not exist")
    kind = kind or detect_kind(uri)
    if kind == "edm-pkl":
        if not sha256:
            raise KDMError(f"an edm-pkl teacher needs its sha256 pinned (--sha256 HEX): importing {uri} parses a "
                           f"pickle, so only the exact file you checked is accepted; its sha256 is "
                           f"{artifacts.sha256_file(uri)}")
        actual = artifacts.sha256_file(uri)
        if actual != sha256:
            raise KDMError(f"sha256 mismatch for {uri}: you pinned {sha256}, the file has {actual}; it is not the "
                           f"file you checked (a different release, a truncated download, or tampered with)")
    else:
        _, actual = _artifact_facts(uri, kind, sha256)
    tid = registry_id(kind, actual)
    rec_url = record_path(root, tid)
    if artifacts.exists(rec_url):
        return Registration(read_record(root, tid), created=False)

    if kind == "edm-pkl":
        from pipeline.teachers.edm_pickle import edm_teacher_id, import_edm_pickle
        teacher_uri = artifacts.join(root, "teachers", edm_teacher_id(actual, "ema"))
        m = import_edm_pickle(uri, teacher_uri, allow_pickle=True, sha256=actual)
        default_source = f"EDM network pickle {uri} (sha256 pinned), imported to {teacher_uri}"
        if m.source is not None and m.source.source_warnings:
            default_source += "; WARNING: " + " ".join(m.source.source_warnings)
    else:
        teacher_uri = uri
        m, _ = _artifact_facts(uri, kind, actual)
        default_source = f"kdm teacher artifact {uri}: {m.origin}"
    model = m.model
    image = model.kind == "edm"
    record = RegisteredTeacher(
        id=tid, uri=uri, kind=kind, sha256=actual, sha256_of="pickle" if kind == "edm-pkl" else "weights",
        teacher_uri=teacher_uri, teacher_id=m.id, model_kind=m.kind,
        img_resolution=model.img_resolution if image else None, img_channels=model.img_channels if image else None,
        label_dim=model.label_dim if image else 0, dataset=m.dataset, source=source or default_source,
        registered_at=utc_now(), code_version=code_version())
    data = (record.model_dump_json(indent=2) + "\n").encode()
    if not _write_once(rec_url, data):   # registered concurrently by another process
        return Registration(read_record(root, tid), created=False)
    return Registration(record, created=True)


# ---------------------------------------------------------------- pending distillations

def weights_sha256(uri: str, m, consequence: str) -> str:
    """sha256 of a teacher artifact's weights file, which must exist and match its manifest; the KDMError
    ends with ``consequence`` (what is refused)."""
    weights = artifacts.join(uri, m.weights_file)
    if not artifacts.exists(weights):
        raise KDMError(f"{weights} is missing; the teacher artifact is incomplete")
    actual = artifacts.sha256_file(weights)
    if actual != m.weights_sha256:
        raise KDMError(f"{weights}: sha256 {actual} does not match its manifest ({m.weights_sha256}); {consequence}")
    return actual


def cifar10_shaped(rec: RegisteredTeacher) -> bool:
    """Teachers the CIFAR-10 distillation can take: EDM denoisers of 3 x 32 x 32 images."""
    return rec.model_kind == "edm" and rec.img_resolution == 32 and rec.img_channels == 3


def default_config_model() -> type[BaseModel]:
    from storage_schemas.distill_image import DistillImageConfig
    return DistillImageConfig


def plan_repo_relative(cfg) -> dict:
    """The plan of ``cfg`` with relative paths taken relative to the repository (the redistill flow's planner)."""
    return default_planner()(cfg)


def default_planner() -> Planner:
    """``pipeline.stages.plan`` of the config with its relative paths taken relative to the repository (as the
    kdm flow does)."""
    from pipeline.stages import plan, resolve_paths
    repo = Path(__file__).resolve().parents[2]
    return lambda cfg: plan(resolve_paths(cfg, repo))


def distill_config(rec: RegisteredTeacher, root: str, preset: str, config_model: type[BaseModel],
                   base: Optional[dict] = None) -> BaseModel:
    """The config a distillation of ``rec`` runs with: ``base`` (e.g. the deployment's default config) with
    preset, root and teacher_uri set (and ``conditional`` = whether the teacher is, where the config has it)."""
    fields = {**(base or {}), "preset": preset, "root": root, "teacher_uri": rec.teacher_uri}
    if "conditional" in config_model.model_fields:
        fields["conditional"] = rec.conditional
    try:
        return config_model.model_validate(fields)
    except ValidationError as e:
        raise KDMError(format_validation_error(e, f"the distillation config of teacher {rec.id}")) from None


def plan_stages(plan: dict) -> dict[str, dict]:
    """The per-stage entries of a plan: ``{stage: {..., 'exists': bool}}`` or ``{'stages': that}``."""
    stages = plan.get("stages", plan) if isinstance(plan, dict) else None
    if isinstance(stages, list):
        stages = {str(s.get("stage", s.get("name", i))): s for i, s in enumerate(stages) if isinstance(s, dict)}
    if not isinstance(stages, dict) or not stages or not all(
            isinstance(v, dict) and isinstance(v.get("exists"), bool) for v in stages.values()):
        raise KDMError(f"the distillation plan is not of the form {{stage: {{'uri', 'version', 'exists'}}}}: {plan!r}")
    return stages


@dataclass(frozen=True)
class PendingTeacher:
    record: RegisteredTeacher
    config: BaseModel
    missing: tuple[str, ...]   # stages whose output does not exist yet


def pending_teachers(root: str, preset: str, *, records: Optional[Iterable[RegisteredTeacher]] = None,
                     select: Optional[Callable[[RegisteredTeacher], bool]] = cifar10_shaped,
                     config_model: Optional[type[BaseModel]] = None, planner: Optional[Planner] = None,
                     base_config: Optional[dict] = None,
                     on_error: Optional[Callable[[RegisteredTeacher, KDMError], None]] = None) -> list[PendingTeacher]:
    """Registered teachers (``records``, default all under ``root``, filtered by ``select``) whose
    distillation under ``preset`` and the current recipe version has a stage whose output is missing.

    A teacher whose config or plan fails raises, or with ``on_error`` is reported to it and skipped (so one
    broken registration does not hold up the others)."""
    root = absolute_uri(root)
    records = list_teachers(root) if records is None else list(records)
    config_model = config_model or default_config_model()
    planner = planner or default_planner()
    out = []
    for rec in records:
        if select is not None and not select(rec):
            continue
        try:
            cfg = distill_config(rec, root, preset, config_model, base_config)
            missing = tuple(name for name, s in plan_stages(planner(cfg)).items() if not s["exists"])
        except KDMError as e:
            if on_error is None:
                raise
            on_error(rec, e)
            continue
        if missing:
            out.append(PendingTeacher(rec, cfg, missing))
    return out
