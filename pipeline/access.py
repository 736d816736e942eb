"""Where a worker may read and write, and which triggered runs it may start: checks a flow makes before any work.

A worker reads and writes only under the artifact roots of its own environment variable
``KDM_ALLOWED_ROOTS``: comma-separated local directories and URL prefixes (``s3://bucket/prefix``); a
list without URLs may also be separated by ``os.pathsep``; ``*`` allows everything explicitly. Local
paths are compared after resolving ``~``, ``..`` and symlinks; URLs as strings on ``/`` boundaries
(``s3://b/kdm`` allows ``s3://b/kdm/x``, not ``s3://b/kdm2``), refusing ``.``/``..`` segments, chained
fsspec URLs (``a::b``) and ``data:`` URLs outright. When the variable is unset the process is taken to be
a development machine (``make demo``, tests): everything is allowed and a warning is logged once, unless
the process talks to an authenticated Prefect API (``PREFECT_API_AUTH_STRING`` set, i.e. a shared
production server), where an unset list is an error: such a worker must say where it may write. A set but
empty list allows nothing. A run started by the ``kdm.teacher.registered`` trigger distills a teacher only
if the registry under the deployment's own root holds the record of exactly that teacher artifact, whose
manifest id and weights (or, for an imported EDM pickle, source pickle) sha256 match it: the event is a
hint, the registry is the truth (``verify_trigger_teacher``). Everything raises KDMError with one
actionable message before anything is read or written.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any, Callable, Mapping, Optional
from urllib.parse import unquote

from pipeline.errors import KDMError
from pipeline.storage import artifacts

ENV = "KDM_ALLOWED_ROOTS"
AUTH_ENV = "PREFECT_API_AUTH_STRING"
EVERYTHING = "*"
logger = logging.getLogger("kdm.access")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*")
_LOCAL_SCHEMES = ("file", "local")
_warned = False


# ----------------------------------------------------------------------------- normalising locations

def normalize_location(uri: str, what: str = "location") -> str:
    """The canonical form of a local path (absolute, ``~``/``..``/symlinks resolved) or URL (lower-case
    scheme, no trailing ``/``); KDMError for what cannot be compared safely."""
    s = str(uri).strip() if uri is not None else ""
    if not s:
        raise KDMError(f"{what} is empty; give an artifact location (a local path or a URL such as s3://bucket/kdm)")
    if "::" in s:
        raise KDMError(f"{what} {uri!r} is a chained fsspec URL ('::'); give a plain local path or URL")
    if s.lower().startswith("data:"):
        raise KDMError(f"{what} {uri!r} is a data: URL, not an artifact location")
    if "\x00" in s:
        raise KDMError(f"{what} {uri!r} contains a NUL character")
    if "://" in s:
        scheme, rest = s.split("://", 1)
        if not _SCHEME.fullmatch(scheme):
            raise KDMError(f"{what} {uri!r} has no valid URL scheme; separate several locations with commas")
        scheme = scheme.lower()
        if scheme not in _LOCAL_SCHEMES:
            segments = rest.split("/") + unquote(rest).split("/")
            if any(seg in (".", "..") for seg in segments) or "\\" in unquote(rest):
                raise KDMError(f"{what} {uri!r} has a '.' or '..' segment (or a backslash); give the location "
                               f"without relative parts")
            rest = rest.rstrip("/")
            if not rest:
                raise KDMError(f"{what} {uri!r} names no bucket or host")
            return f"{scheme}://{rest}"
        s = rest
    return os.path.realpath(os.path.expanduser(s))


def _within(target: str, root: str) -> bool:
    if root == EVERYTHING:
        return True
    if target == root:
        return True
    return target.startswith(root if root.endswith("/") else root + "/")


# ----------------------------------------------------------------------------- the worker's allowed roots

def _split(value: str) -> list[str]:
    out = []
    for piece in value.replace("\n", ",").split(","):
        piece = piece.strip()
        if not piece:
            continue
        if "://" not in piece and os.pathsep != "," and os.pathsep in piece:
            out += [p.strip() for p in piece.split(os.pathsep) if p.strip()]
        else:
            out.append(piece)
    return out


def allowed_roots(environ: Optional[Mapping[str, str]] = None) -> Optional[list[str]]:
    """The normalised roots of ``KDM_ALLOWED_ROOTS`` (``['*']`` for everything, ``[]`` for nothing), or None
    when it is unset (see the module docstring for what that means)."""
    env = os.environ if environ is None else environ
    value = env.get(ENV)
    if value is None:
        return None
    entries = _split(value)
    if EVERYTHING in entries:
        return [EVERYTHING]
    return [normalize_location(e, f"{ENV} entry") for e in entries]


def check_root_allowed(uri: str, what: str, environ: Optional[Mapping[str, str]] = None) -> None:
    """KDMError unless ``uri`` (called ``what`` in the message, e.g. 'root' or 'teacher_uri') lies under one of
    the worker's allowed roots. Relative local paths are taken relative to the current directory: resolve
    them as the flow does first."""
    env = os.environ if environ is None else environ
    target = normalize_location(uri, what)
    roots = allowed_roots(env)
    if roots is None:
        if env.get(AUTH_ENV):
            raise KDMError(f"{ENV} is not set on this worker, which talks to an authenticated Prefect API "
                           f"({AUTH_ENV} is set): refusing to use {what} {uri}. Set {ENV} in the worker's "
                           f"environment to the artifact roots it may read and write (comma-separated, e.g. "
                           f"{ENV}=s3://kdm-artifacts), or {ENV}='*' to allow everything")
        global _warned
        if not _warned:
            _warned = True
            logger.warning("%s is not set: this process reads and writes wherever a flow parameter points "
                           "(fine for a development machine; set it on every production worker)", ENV)
        return
    if not any(_within(target, r) for r in roots):
        where = ", ".join(roots) if roots else "none (it is set but empty)"
        shown = f"{uri} (resolves to {target})" if target != str(uri) else str(uri)
        raise KDMError(f"{what} {shown} is outside the artifact roots this worker may use ({ENV}: {where}); "
                       f"use a location under one of them, or add it to {ENV} in the worker's environment")


def location_fields(obj: Any, prefix: str = "") -> dict[str, str]:
    """``{'root': ..., 'teacher_uri': ..., 'dataset.archive': ...}``: every string field of a config or stage
    request (a pydantic model or mapping, nested) named ``root``, ``archive``, ``uri`` or ``*_uri``."""
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    out: dict[str, str] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            name = f"{prefix}{k}"
            if isinstance(v, str) and (k in ("root", "archive", "uri") or str(k).endswith("_uri")):
                out[name] = v
            elif isinstance(v, (Mapping, list, tuple)) or hasattr(v, "model_dump"):
                out.update(location_fields(v, name + "."))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(location_fields(v, f"{prefix}{i}."))
    return out


def check_locations_allowed(obj: Any, environ: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """``check_root_allowed`` for every location field of ``obj`` (see ``location_fields``); returns them."""
    fields = location_fields(obj)
    for name, uri in fields.items():
        check_root_allowed(uri, name, environ)
    return fields


# ----------------------------------------------------------------------------- triggered runs

def verify_trigger_teacher(root: str, teacher_uri: str, *, expected_root: Optional[str] = None,
                           sha256: Optional[str] = None, teacher_id: Optional[str] = None,
                           environ: Optional[Mapping[str, str]] = None):
    """The registry record (storage_schemas.registry.RegisteredTeacher) under ``root`` of the teacher
    artifact at ``teacher_uri``, after checking that both are under the allowed roots, that ``root`` is
    ``expected_root`` (the deployment's own, when given), that the artifact's weights still hash to its
    manifest, and that the record names exactly this artifact: same URI, manifest id, and sha256 (of the
    weights, or for an imported EDM pickle of the source pickle). ``sha256`` / ``teacher_id`` (e.g. from the
    event payload) must match too when given. KDMError otherwise."""
    from pipeline.teachers import registry
    from pipeline.teachers.registry import absolute_uri, read_record, registry_id
    from storage_schemas import TeacherManifest
    from storage_schemas.registry import record_path

    if not teacher_uri:
        raise KDMError("a triggered distillation needs teacher_uri (the registered teacher artifact); none was given")
    check_root_allowed(root, "root", environ)
    check_root_allowed(teacher_uri, "teacher_uri", environ)
    if expected_root is not None and normalize_location(root, "root") != normalize_location(expected_root, "root"):
        raise KDMError(f"root {root} is not this deployment's artifact root {expected_root}: a triggered run only "
                       f"distills teachers registered under its own root; register the teacher there")
    root_abs, uri_abs = absolute_uri(root), absolute_uri(teacher_uri)
    hint = f"register it with `kdm teacher register {uri_abs} --root {root_abs}`"
    try:
        m = artifacts.read_model(artifacts.join(uri_abs, artifacts.MANIFEST), TeacherManifest)
    except KDMError as e:
        raise KDMError(f"teacher_uri {uri_abs} is not a readable kdm teacher artifact ({e}); nothing is "
                       f"distilled") from None
    except Exception as e:   # malformed JSON, permissions, transport errors
        raise KDMError(f"teacher_uri {uri_abs}: cannot read its manifest ({type(e).__name__}: {e}); nothing is "
                       f"distilled") from None
    if "/" in m.weights_file or "\\" in m.weights_file or m.weights_file in ("", ".", ".."):
        raise KDMError(f"{uri_abs}: manifest weights_file {m.weights_file!r} is not a plain file name")
    actual = registry.weights_sha256(uri_abs, m, "the teacher was modified after registration; nothing is "
                                                 "distilled")
    candidates = [("kdm" if m.kind == "edm" else "flow-matching", actual)]
    if m.source is not None:
        candidates.append(("edm-pkl", m.source.sha256))
    rec = None
    for kind, sha in candidates:
        rid = registry_id(kind, sha)
        if artifacts.exists(record_path(root_abs, rid)):
            try:
                rec = read_record(root_abs, rid)
            except Exception as e:
                raise KDMError(f"the registry record {record_path(root_abs, rid)} is unreadable "
                               f"({type(e).__name__}: {e})") from None
            break
    if rec is None:
        raise KDMError(f"teacher_uri {uri_abs} is not registered under root {root_abs} (no registry record for "
                       f"its sha256 {actual}); the kdm.teacher.registered event is only a hint, the registry is "
                       f"the truth: nothing is distilled; {hint}")
    expected_sha = m.source.sha256 if rec.kind == "edm-pkl" else actual
    problems = []
    if absolute_uri(rec.teacher_uri) != uri_abs:
        problems.append(f"the record names teacher_uri {rec.teacher_uri}, not {uri_abs}")
    if rec.teacher_id != m.id:
        problems.append(f"the record's teacher_id is {rec.teacher_id}, the artifact's manifest id {m.id}")
    if rec.sha256 != expected_sha:
        problems.append(f"the record's sha256 is {rec.sha256}, the artifact's {expected_sha}")
    if sha256 is not None and sha256.strip().lower() != rec.sha256:
        problems.append(f"the event's sha256 {sha256} is not the record's {rec.sha256}")
    if teacher_id is not None and teacher_id != rec.teacher_id:
        problems.append(f"the event's teacher_id {teacher_id} is not the record's {rec.teacher_id}")
    if problems:
        raise KDMError(f"teacher_uri {uri_abs} does not match its registration {rec.id} under {root_abs}: "
                       + "; ".join(problems) + f"; nothing is distilled; {hint}")
    return rec


def triggered_by_automation(flow_run: Any = None) -> bool:
    """Whether the flow run (default: the current one, read from the Prefect API) was created by an
    automation, e.g. the ``kdm.teacher.registered`` trigger of a deployment."""
    if flow_run is None:
        from prefect.runtime import flow_run as current
        run_id = current.get_id()
        if not run_id:
            return False
        from prefect.client.orchestration import get_client
        with get_client(sync_client=True) as client:
            flow_run = client.read_flow_run(run_id)
    created_by = getattr(flow_run, "created_by", None)
    if created_by is not None and str(getattr(created_by, "type", "")).upper() == "AUTOMATION":
        return True
    return str(getattr(flow_run, "idempotency_key", None) or "").startswith("automation ")


def deployment_root(default: str, parameters: Optional[Mapping[str, Any]] = None) -> str:
    """The artifact root of the current run's deployment: its top-level ``root`` parameter, else its
    ``config.root``, else ``default`` (the config's default). ``parameters``: the deployment's parameters
    (default: the current run's deployment, read from the Prefect API; not ``prefect.runtime.deployment.
    parameters``, which are the run's own, i.e. what the event sent)."""
    if parameters is None:
        from prefect.runtime import deployment
        dep_id = deployment.get_id()
        if not dep_id:
            return str(default)
        from prefect.client.orchestration import get_client
        with get_client(sync_client=True) as client:
            parameters = client.read_deployment(dep_id).parameters or {}
    root = parameters.get("root")
    if not root and isinstance(parameters.get("config"), Mapping):
        root = parameters["config"].get("root")
    return str(root or default)


def guard_run(config: Any, *, default_root: str = "artifacts", resolve: Optional[Callable[[str], str]] = None,
              triggered: Optional[bool] = None, log: Optional[Callable[[str], None]] = None,
              environ: Optional[Mapping[str, str]] = None):
    """All checks a distillation flow makes before any work, on its validated config (relative local
    paths already resolved): every location field under the allowed roots; for a run created by an
    automation (``triggered``, default ``triggered_by_automation()``), ``verify_trigger_teacher`` against the
    deployment's own root (``resolve`` maps a relative root the way the flow does). Returns the verified
    registry record (None for a run that was not triggered); logs the refusal with ``log`` (default: this
    module's logger) and re-raises the KDMError."""
    log = log or logger.error
    try:
        check_locations_allowed(config, environ)
        if triggered is None:
            triggered = triggered_by_automation()
        if not triggered:
            return None
        own = deployment_root(default_root)
        own = resolve(own) if resolve else own
        get = (lambda k: config.get(k)) if isinstance(config, Mapping) else (lambda k: getattr(config, k, None))
        return verify_trigger_teacher(get("root"), get("teacher_uri"), expected_root=own, environ=environ)
    except KDMError as e:
        log(f"refused before any work: {e}")
        raise
