"""Artifact directories at any fsspec URL: atomic commit (manifest written last), JSON I/O, hashing.

A directory artifact is written under ``<url>.partial`` and committed by writing ``manifest.json``
(or, for Zarr stores, the ``kdm`` group attribute) and renaming it to ``<url>``. Readers only trust
an artifact whose manifest exists, so a killed writer never leaves a readable half-version.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any, Type, TypeVar

import fsspec
from pydantic import BaseModel, ValidationError

from storage_schemas import format_validation_error

from pipeline.errors import ArtifactExists, ArtifactMissing, KDMError

M = TypeVar("M", bound=BaseModel)
MANIFEST = "manifest.json"
RUN_FORMATS = ("(kdm-student)", "(kdm-image-student)")   # committed_kind of a finished training run
RUN_CONFIG = "config.json"        # a training run's config, written first (pipeline.storage.checkpoints.claim_run)
CKPT_DIR = "checkpoints"          # a training run's checkpoints (pipeline.storage.checkpoints)
METRICS_FILE = "metrics.jsonl"    # a training run's metrics log


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The file system and path of ``url``. Remote credentials and endpoints come from the environment
    (for s3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL[_S3], read by botocore)."""
    fs, path = fsspec.core.url_to_fs(str(url))
    return fs, path


def is_local(url: str) -> bool:
    return "://" not in str(url) or str(url).startswith("file://")


def join(url: str, *parts: str) -> str:
    url = str(url).rstrip("/")
    return "/".join([url, *[p.strip("/") for p in parts]])


def partial_url(url: str) -> str:
    return str(url).rstrip("/") + ".partial"


def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    if not is_local(url):
        fs.invalidate_cache(path)   # other writers (Zarr's own file system instance, other processes)
    return fs.exists(path)


def write_bytes(url: str, data: bytes) -> None:
    fs, path = url_to_fs(url)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def read_bytes(url: str) -> bytes:
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as f:
        return f.read()


def write_json(url: str, obj: Any) -> None:
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    write_bytes(url, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


def read_model(url: str, model: Type[M]) -> M:
    try:
        raw = read_json(url)
    except FileNotFoundError:
        parent = str(url).rstrip("/").rsplit("/", 1)[0] if "/" in str(url) else "."
        if not exists(parent):
            raise ArtifactMissing(f"{parent} does not exist (looked for {url}); check the path") from None
        raise ArtifactMissing(f"{url} does not exist: {parent} is not a finished kdm artifact of this kind "
                              f"(unfinished, or another kind); check the path") from None
    except ValueError:
        raise KDMError(f"{url} is not valid JSON: the artifact is damaged; write it again") from None
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise KDMError(format_validation_error(e, url)) from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(url: str, block: int = 1 << 22) -> str:
    fs, path = url_to_fs(url)
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def read_verified(url: str, sha256: str, what: str) -> bytes:
    """The bytes at ``url``, refused unless their sha256 equals the one a manifest recorded."""
    data = read_bytes(url)
    digest = sha256_bytes(data)
    if digest != sha256:
        raise KDMError(f"{url}: sha256 {digest[:16]} does not match the manifest ({sha256[:16]}); the {what} "
                       f"is corrupt or was modified")
    return data


def committed(url: str) -> bool:
    """A directory artifact is committed once its manifest exists at the final URL."""
    return exists(join(url, MANIFEST))


def begin(url: str, fresh: bool = False) -> str:
    """Prepare the temporary location of a directory artifact; returns its URL.

    An existing ``.partial`` directory is kept (resumable writers pick up from it) unless ``fresh``.
    """
    tmp = partial_url(url)
    fs, path = url_to_fs(tmp)
    if not is_local(tmp):
        fs.invalidate_cache(path)
    if fresh and fs.exists(path):
        fs.rm(path, recursive=True)
    fs.makedirs(path, exist_ok=True)   # a no-op on object stores, where empty "directories" don't exist
    return tmp


def discard(url: str) -> None:
    """Remove the temporary location of ``url`` (a writer that refused its input and cannot resume)."""
    fs, path = url_to_fs(partial_url(url))
    if fs.exists(path):
        fs.rm(path, recursive=True)


# Files that make a directory readable as a committed artifact: copied last by a non-atomic commit.
_MARKERS = (MANIFEST, "zarr.json")


def commit(url: str, markers: tuple[str, ...] = ()) -> None:
    """Move ``<url>.partial`` to ``<url>``.

    An atomic rename on local file systems. Object stores have no rename: the files are copied with the
    markers (``manifest.json``, Zarr metadata holding the ``kdm`` attribute, and the file names given in
    ``markers``, e.g. an evaluation's ``report.json``) last, the root's at the very end, so a reader never
    sees a committed manifest before the data; then ``.partial`` is deleted.
    """
    tmp = partial_url(url)
    fs, src = url_to_fs(tmp)
    _, dst = url_to_fs(url)
    if is_local(url):
        if fs.exists(dst):
            raise ArtifactExists(f"{url} appeared while it was being written; refusing to overwrite it")
        os.replace(src, dst)
        return
    fs.invalidate_cache()
    if fs.exists(dst):
        raise ArtifactExists(f"{url} appeared while it was being written; refusing to overwrite it")
    src = src.rstrip("/")
    rels = [f[len(src) + 1:] for f in fs.find(src)]

    names = set(_MARKERS) | set(markers)

    def order(rel: str) -> tuple[bool, int]:
        return rel.rsplit("/", 1)[-1] in names, -rel.count("/")   # data first; markers deepest first

    rels.sort(key=order)
    data = [r for r in rels if not order(r)[0]]
    if data:
        fs.copy([f"{src}/{r}" for r in data], [f"{dst}/{r}" for r in data])
    for r in rels[len(data):]:
        fs.copy(f"{src}/{r}", f"{dst}/{r}")
    fs.rm(src, recursive=True)
    fs.invalidate_cache()


def committed_kind(url: str) -> str | None:
    """What kind of committed kdm artifact ``url`` holds ('teacher', 'pair store', ...), None if none."""
    try:
        raw = read_json(join(url, MANIFEST))
        fmt = raw.get("format") if isinstance(raw, dict) else None
        if fmt:
            return f"{fmt.removeprefix('kdm-').replace('-', ' ')} artifact ({fmt})"
        if isinstance(raw, dict) and raw.get("kind"):
            return f"{raw['kind']} teacher"
    except (FileNotFoundError, ValueError):
        pass
    try:
        attrs = read_json(join(url, "zarr.json")).get("attributes", {})
    except (FileNotFoundError, ValueError, AttributeError):
        return None
    kdm = attrs.get("kdm") if isinstance(attrs, dict) else None
    if isinstance(kdm, dict):
        return "pair store" if kdm.get("format") == "kdm-pairs" else f"{kdm.get('format', 'kdm')} store"
    return None


def check_target(url: str, version: str, manifest_reader) -> bool:
    """Returns True when ``url`` already holds this version (the stage is a no-op).

    Raises when it holds another version: artifacts are immutable.
    """
    if not exists(url):
        return False
    try:
        existing = manifest_reader(url)
    except ArtifactMissing:
        _refuse_target(url, committed_kind(url))
    other = getattr(existing, "version", None) or getattr(existing, "id", None)
    if other == version:
        return True
    raise _immutable(url, other, version)


def _immutable(url, other: str | None, version: str) -> ArtifactExists:
    return ArtifactExists(f"{url} already holds version {other}, not {version}; artifacts are immutable: "
                          f"choose another output location or delete the old one")


def _refuse_target(url: str, found: str | None) -> None:
    if found:
        raise ArtifactExists(f"{url} holds a committed {found}, not the artifact this command writes; choose "
                             f"another output location (that one is kept)") from None
    what = "is a file" if is_local(url) and local_path(url).is_file() else "exists but is not a committed kdm artifact"
    raise ArtifactExists(f"{url} {what}; choose another output location (it is kept)") from None


def precheck_target(url: str, kind: str) -> None:
    """The cheap part of ``check_target``, for a command to run before its heavy imports: refuse a local
    ``url`` that exists and is not a committed artifact whose ``committed_kind`` ends with ``kind``. (Whether
    it holds this very version is decided later, by check_target.)"""
    if not is_local(url) or not local_path(url).exists():
        return
    found = committed_kind(url)
    if found is None or not found.endswith(kind):
        _refuse_target(url, found)


def check_run_dir(run: Path, config_name: str) -> None:
    """Refuse ``run`` as a run directory when it is a file, or holds anything but a run (a run has
    ``config_name``, its checkpoints and metrics): a run never writes into another artifact. Commands
    call it before they import torch."""
    if run.exists() and not run.is_dir():
        raise KDMError(f"{run} is a file, not a run directory; choose a directory path for --out")
    if not run.is_dir():
        return
    found = committed_kind(str(run))
    if found and not found.endswith(RUN_FORMATS):     # e.g. a teacher (it has a config.json too)
        raise ArtifactExists(f"{run} holds another kind of artifact, a committed {found}, not a training run; "
                             f"choose a new or empty directory for --out (it is kept)")
    if (run / config_name).exists():
        return
    others = sorted(p.name for p in run.iterdir() if p.name not in (CKPT_DIR, METRICS_FILE))
    if others:
        found = committed_kind(str(run))
        kind = (f"another kind of artifact, a committed {found}" if found else
                "a Zarr store (e.g. a pair store)" if "zarr.json" in others else
                "another kind of artifact" if "manifest.json" in others else "other files")
        shown = ", ".join(others[:4]) + (", ..." if len(others) > 4 else "")
        raise ArtifactExists(f"{run} is not empty and is not a run of this config: it holds {kind} ({shown}); "
                             f"choose a new or empty directory for --out")


def check_run_version(config_file: Path, version: str, holds: str,
                      hint: str = "choose another --out to start a new run") -> bool:
    """True when the run directory of ``config_file`` holds a run of ``version`` (resume it), False when it
    holds no run yet; ArtifactExists ("<holds> (version ..., this is ...); <hint>") for a run of another
    version, and check_run_dir's refusals for anything that is not a run. Torch-free: commands call it first."""
    check_run_dir(config_file.parent, config_file.name)
    if not config_file.exists():
        return False
    try:
        old = json.loads(config_file.read_text())
    except ValueError:
        raise ArtifactExists(f"{config_file} is not a readable run config; {hint}") from None
    if not isinstance(old, dict) or old.get("version") != version:
        old_v = old.get("version") if isinstance(old, dict) else None
        if (config_file.parent / MANIFEST).exists():     # a finished run: a committed artifact
            raise _immutable(config_file.parent, old_v, version)
        raise ArtifactExists(f"{holds} (version {old_v}, this is {version}); {hint}")
    return True


def local_path(url: str) -> Path:
    if not is_local(url):
        raise KDMError(f"{url} must be a local path here")
    return Path(str(url).removeprefix("file://"))


@contextlib.contextmanager
def writer_lock(out: str, what: str):
    """One writer per local ``out``: the process holds ``<out>.lock`` (its host and pid) while it runs; a
    second ``what`` (e.g. 'kdm train') onto the same ``out`` is refused while that process lives, and a lock
    left by a killed process is taken over. Remote URLs: no lock (a no-op)."""
    if not is_local(out):
        yield
        return
    lock = local_path(out).with_name(local_path(out).name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                host, pid = lock.read_text().split()
            except (OSError, ValueError):
                host, pid = "", "0"
            if host == socket.gethostname() and _alive(int(pid)):
                raise KDMError(f"another `{what}` (pid {pid}) is writing {out}; wait for it to finish "
                               f"(rerunning then is a no-op) or stop it, then rerun") from None
            if host not in ("", socket.gethostname()):
                raise KDMError(f"{lock} says host {host} (pid {pid}) is writing {out}; if no run is active there, "
                               f"delete {lock} and rerun") from None
            lock.unlink(missing_ok=True)      # left by a killed run
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        break
    else:
        raise KDMError(f"could not take the writer lock {lock}; delete it if no run is active and rerun")
    try:
        yield
    finally:
        try:
            if lock.read_text() == me:
                lock.unlink()
        except OSError:
            pass


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
