"""Artifact directories at any fsspec URL: atomic commit (manifest written last), JSON I/O, hashing.

A directory artifact is written under ``<url>.partial`` and committed by writing ``manifest.json``
(or, for Zarr stores, the ``kdm`` group attribute) and renaming it to ``<url>``. Readers only trust
an artifact whose manifest exists, so a killed writer never leaves a readable half-version.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any, Optional, Type, TypeVar

import fsspec
from pydantic import BaseModel, ValidationError

from storage_schemas import format_validation_error

from pipeline.errors import ArtifactExists, ArtifactMissing, DataCorrupt, KDMError

log = logging.getLogger("kdm.artifacts")
M = TypeVar("M", bound=BaseModel)
MANIFEST = "manifest.json"
RUN_FORMATS = ("(kdm-student)", "(kdm-image-student)")   # committed_kind of a finished training run
RUN_CONFIG = "config.json"        # a training run's config, written first (pipeline.storage.checkpoints.claim_run)
CKPT_DIR = "checkpoints"          # a training run's checkpoints (pipeline.storage.checkpoints)
METRICS_FILE = "metrics.jsonl"    # a training run's metrics log


IO_WORKERS = max(1, int(os.environ.get("KDM_IO_WORKERS", "8")))   # requests in flight at once on an object store


def io_map(fn, items, remote: bool = True) -> list:
    """``[fn(x) for x in items]``, on an object store (``remote``) with up to IO_WORKERS calls at a time (the
    first exception, in item order, is raised); serial on local disks."""
    items = list(items)
    if not remote or len(items) < 2 or IO_WORKERS == 1:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(min(IO_WORKERS, len(items)), thread_name_prefix="kdm-io") as ex:
        return list(ex.map(fn, items))


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


UPLOAD_ATTEMPTS = 3     # a damaged upload (the store kept other bytes than were sent) is sent again this often


def write_bytes(url: str, data: bytes) -> None:
    """Write ``data`` to ``url``. On an object store the upload is verified: the object's size and sha256 as
    the store holds it must equal what was sent (a store can acknowledge a PUT and keep a short body); a
    damaged upload is sent again, and after UPLOAD_ATTEMPTS raises KDMError."""
    fs, path = url_to_fs(url)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    for attempt in range(UPLOAD_ATTEMPTS):
        if is_local(url):
            with fs.open(path, "wb") as f:
                f.write(data)
            return
        try:
            with fs.open(path, "wb") as f:
                f.write(data)
        except Exception as e:
            raise _remote_write_error(url, e) from None
        problem = stored_problem(fs, path, len(data), sha256_bytes(data))
        if problem is None:
            return
        log.warning("upload of %s was damaged (%s); sending it again", url, problem)
    raise damaged_upload(url, problem)


def put_file(fs, local: str | Path, path: str, url: Optional[str] = None) -> None:
    """Upload the local file ``local`` to ``path`` of the (remote) file system ``fs``, verified like
    ``write_bytes`` (size and sha256 of what the store holds, sent again when damaged)."""
    local = Path(local)
    size, digest = local.stat().st_size, sha256_file(str(local))
    for attempt in range(UPLOAD_ATTEMPTS):
        try:
            fs.put_file(str(local), path)
        except Exception as e:
            raise _remote_write_error(url or fs.unstrip_protocol(path), e) from None
        problem = stored_problem(fs, path, size, digest)
        if problem is None:
            return
        log.warning("upload of %s to %s was damaged (%s); sending it again", local, path, problem)
    raise damaged_upload(url or fs.unstrip_protocol(path), problem)


def _remote_write_error(url: str, e: Exception) -> Exception:
    """A transport or permission error while writing ``url`` as such (KDMError); anything else unchanged."""
    return transport_error(url, e, "writing") or e




def stored_problem(fs, path: str, size: int, sha256: Optional[str] = None) -> Optional[str]:
    """None when the object at ``path`` holds ``size`` bytes (and, given ``sha256``, those bytes); else
    what differs."""
    fs.invalidate_cache(path)
    try:
        got = fs.info(path)["size"]
    except FileNotFoundError:
        return "the object is missing"
    if got != size:
        return f"the store holds {got} of the {size} bytes written"
    if sha256 is not None:
        h = hashlib.sha256()
        with fs.open(path, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        if h.hexdigest() != sha256:
            return f"the store holds {size} bytes whose sha256 differs from what was written"
    return None


def damaged_upload(url: str, problem: str) -> KDMError:
    return KDMError(f"the upload of {url} was damaged after {UPLOAD_ATTEMPTS} attempts ({problem}); the object "
                    f"store or a proxy on the way keeps short or altered bodies: check it (or enable payload "
                    f"checksums), then rerun (finished work is kept)")


def short(text: str, limit: int = 160) -> str:
    """The first line of ``text``, cut at a word boundary to at most ``limit`` characters ('...' when cut)."""
    line = (str(text).strip().splitlines() or [""])[0].strip()
    if len(line) <= limit:
        return line
    cut = line[:limit].rsplit(" ", 1)[0].rstrip(" ,;:(")
    return cut + " ..."


_TRANSPORT_MODULES = ("aiohttp", "botocore", "aiobotocore", "urllib3", "requests", "http.client", "ssl")


def transport_problem(e: BaseException) -> Optional[str]:
    """What went wrong, in one line, when ``e`` (or an exception it was raised from) is a transport or
    permission error of a remote store (a reset connection, a timeout, an HTTP 5xx after the client's
    retries, access denied); None for anything else (e.g. a checksum or decode failure: damage)."""
    seen = set()
    x: Optional[BaseException] = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        text = str(x)
        if "checksum" in text.lower():
            return None
        mod = type(x).__module__ or ""
        if isinstance(x, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
            return f"permission denied ({short(text, 120)}): check the credentials and the bucket policy"
        if (isinstance(x, (ConnectionError, TimeoutError)) or mod.startswith(_TRANSPORT_MODULES)
                or (isinstance(x, OSError) and x.errno in (5, 16, 104, 110, 121))):
            what = short(text, 120) or type(x).__name__
            return f"a transport error: {type(x).__name__}: {what}"
        x = x.__cause__ or x.__context__
    return None


def transport_error(url: str, e: BaseException, doing: str = "reading") -> Optional[KDMError]:
    """A KDMError for a transport or permission error ``e`` met while ``doing`` ``url`` (None otherwise):
    the data is not blamed; the advice is to rerun once the store is reachable."""
    problem = transport_problem(e)
    if problem is None:
        return None
    return KDMError(f"{doing} {url} failed with {problem}; the stored data was not found damaged: rerun once the "
                    f"object store is reachable (finished work is kept)")


@contextlib.contextmanager
def _opened(url: str):
    """``url`` open for reading; a transport or permission error of an object store is raised as such
    (``_remote_read_error``), a missing file as FileNotFoundError, local errors unchanged."""
    fs, path = url_to_fs(url)
    try:
        with fs.open(path, "rb") as f:
            yield f
    except FileNotFoundError:
        raise
    except Exception as e:
        if is_local(url):
            raise
        raise _remote_read_error(url, e) from None


def read_bytes(url: str) -> bytes:
    with _opened(url) as f:
        return f.read()


def _remote_read_error(url: str, e: Exception) -> Exception:
    """A transport or permission error while reading ``url`` as such; a checksum failure the store's client
    reported as damage; anything else unchanged."""
    err = transport_error(url, e)
    if err is not None:
        return err
    if "checksum" in str(e).lower():
        return DataCorrupt(f"{url}: the checksum the object store recorded does not match the bytes it returned "
                           f"({short(str(e), 120)}): the object is damaged; write it again or restore it from a copy")
    return e


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
    h = hashlib.sha256()
    with _opened(url) as f:
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
    sees a committed manifest before the data; every copy is checked against the size of its source before
    the markers are written; then ``.partial`` is deleted.

    A commit cut off before its markers (a kill, a permanent error) leaves ``<url>`` holding part of the
    copies: committing the same ``.partial`` again clears them and copies again. Objects under ``<url>``
    that ``.partial`` does not hold (foreign data) are refused.
    """
    tmp = partial_url(url)
    fs, src = url_to_fs(tmp)
    _, dst = url_to_fs(url)
    if is_local(url):
        if fs.exists(dst):
            raise ArtifactExists(f"{url} appeared while it was being written; refusing to overwrite it")
        os.replace(src, dst)
        return
    try:
        _commit_remote(fs, url, tmp, src, dst, markers)
    except KDMError:
        raise
    except Exception as e:
        err = transport_error(url, e, "committing")
        if err is None:
            raise
        raise KDMError(f"{err}; {tmp} holds the finished artifact: the rerun of the same command finishes the "
                       f"commit") from None


def _commit_remote(fs, url: str, tmp: str, src: str, dst: str, markers: tuple[str, ...]) -> None:
    fs.invalidate_cache()
    src = src.rstrip("/")
    dst = dst.rstrip("/")
    sizes = {f[len(src) + 1:]: info["size"] for f, info in fs.find(src, detail=True).items()}
    if fs.exists(dst):
        if committed_kind(url) is not None or any(exists(join(url, m)) for m in markers):
            raise ArtifactExists(f"{url} appeared while it was being written; refusing to overwrite it")
        there = [f[len(dst) + 1:] for f in fs.find(dst)]
        foreign = sorted(r for r in there if r not in sizes)
        if foreign:
            raise ArtifactExists(f"{url} holds objects that {tmp} does not ({', '.join(foreign[:3])}"
                                 f"{', ...' if len(foreign) > 3 else ''}): not an unfinished commit of this "
                                 f"artifact; delete everything under {url}/ (e.g. `aws s3 rm --recursive "
                                 f"{url}/`) and rerun, or choose another output location")
        log.info("%s holds an unfinished commit (%d of %d objects): clearing it and copying again",
                 url, len(there), len(sizes))
        fs.rm(dst, recursive=True)
        fs.invalidate_cache()
    rels = list(sizes)
    names = set(_MARKERS) | set(markers)

    def order(rel: str) -> tuple[bool, int]:
        return rel.rsplit("/", 1)[-1] in names, -rel.count("/")   # data first; markers deepest first

    rels.sort(key=order)
    data = [r for r in rels if not order(r)[0]]
    if data:
        fs.copy([f"{src}/{r}" for r in data], [f"{dst}/{r}" for r in data])
        fs.invalidate_cache()
        held = {f[len(dst) + 1:]: info["size"] for f, info in fs.find(dst, detail=True).items()}
        bad = [r for r in data if held.get(r) != sizes[r]]
        if bad:
            r = bad[0]
            raise KDMError(f"committing {url}: the copy of {r} holds {held.get(r, 'no')} bytes, {tmp} holds "
                           f"{sizes[r]}; the object store damaged the copy: rerun (the commit is finished from "
                           f"{tmp})")
    marks = rels[len(data):]
    for depth in sorted({r.count("/") for r in marks}, reverse=True):   # deepest first, the root's last
        level = [r for r in marks if r.count("/") == depth]
        io_map(lambda r: fs.copy(f"{src}/{r}", f"{dst}/{r}"), level)
        for r in level:
            problem = stored_problem(fs, f"{dst}/{r}", sizes[r])
            if problem is not None:
                raise KDMError(f"committing {url}: the copy of {r} is damaged ({problem}); rerun (the commit is "
                               f"finished from {tmp})")
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
    """Returns True when ``url`` already holds this version (the stage is a no-op), after checking the files
    its manifest records (``verify_committed``).

    Raises when it holds another version: artifacts are immutable. On an object store, a commit of this
    version that was cut off (``<url>.partial`` holds the finished artifact, ``<url>`` none or part of its
    copies) is finished first; one of another version is refused, naming what to delete.
    """
    if not is_local(url):
        finish_commit(url, version, manifest_reader)
    if not exists(url):
        return False
    try:
        existing = manifest_reader(url)
    except ArtifactMissing:
        _refuse_target(url, committed_kind(url))
    other = getattr(existing, "version", None) or getattr(existing, "id", None)
    if other == version:
        verify_committed(url, existing)
        return True
    raise _immutable(url, other, version)


def finish_commit(url: str, version: str, manifest_reader) -> bool:
    """Finish a cut-off commit of ``url`` (remote): when ``<url>`` holds no committed artifact and
    ``<url>.partial`` holds a finished one of ``version``, commit it (clearing copies a cut-off commit left);
    True when it did. A finished ``.partial`` of another version beside an unfinished ``<url>`` is refused."""
    tmp = partial_url(url)
    if committed_kind(url) is not None or committed_kind(tmp) is None:
        return False
    try:
        pending = manifest_reader(tmp)
    except KDMError:
        return False
    other = getattr(pending, "version", None) or getattr(pending, "id", None)
    if other != version:
        if exists(url):
            raise ArtifactExists(f"{url} holds an unfinished commit of version {other} (its finished copy is "
                                 f"{tmp}), not {version}: rerun the command that wrote {other} to finish it, or "
                                 f"delete both {url}/ and {tmp}/ (e.g. `aws s3 rm --recursive {url}/` and the "
                                 f"same for {tmp}/) and rerun")
        return False
    log.info("finishing the commit of %s from %s", url, tmp)
    commit(url)
    return True


def verify_committed(url: str, manifest) -> None:
    """Check the files a committed artifact's manifest records: the weights file against ``weights_sha256``,
    and the size of every file each checkpoint's ``state.json`` records. DataCorrupt names the file and says
    what to delete."""
    digest = getattr(manifest, "weights_sha256", None)
    name = getattr(manifest, "weights_file", None)
    problems = []
    if digest and name:
        f = join(url, name)
        try:
            got = sha256_file(f)
        except FileNotFoundError:
            got = None
        if got != digest:
            problems.append(f"{name} is missing" if got is None else
                            f"{name} does not match the sha256 its manifest records")
    if not problems and not is_local(url):
        fs, path = url_to_fs(join(url, CKPT_DIR))
        fs.invalidate_cache()
        if fs.exists(path):
            held = {f[len(path.rstrip('/')) + 1:]: info["size"] for f, info in fs.find(path, detail=True).items()}
            for rel in sorted(r for r in held if r.endswith("/state.json")):
                try:
                    files = json.loads(read_bytes(join(url, CKPT_DIR, rel))).get("_files") or {}
                except (ValueError, AttributeError):
                    problems.append(f"{CKPT_DIR}/{rel} is unreadable")
                    break
                step = rel.rsplit("/", 1)[0]
                for fname, (size, _) in sorted(files.items()):
                    if held.get(f"{step}/{fname}") != size:
                        problems.append(f"{CKPT_DIR}/{step}/{fname} holds {held.get(f'{step}/{fname}', 'no')} "
                                        f"bytes, {size} were written")
                        break
    if problems:
        raise DataCorrupt(f"{url} is committed as version {getattr(manifest, 'version', None) or manifest.id} but "
                          f"{problems[0]}: the store holds a damaged copy; delete {url} (everything under it) and "
                          f"rerun")


def _immutable(url, other: str | None, version: str) -> ArtifactExists:
    return ArtifactExists(f"{url} already holds version {other}, not {version}; artifacts are immutable: "
                          f"choose another output location or delete the old one")


def _refuse_target(url: str, found: str | None) -> None:
    if found:
        raise ArtifactExists(f"{url} holds a committed {found}, not the artifact this command writes; choose "
                             f"another output location (that one is kept)") from None
    if not is_local(url):
        raise ArtifactExists(f"{url} holds objects but no committed kdm artifact, and {partial_url(url)} holds no "
                             f"finished one to complete it from; delete everything under {url}/ (e.g. `aws s3 rm "
                             f"--recursive {url}/`) and rerun, or choose another output location") from None
    what = "is a file" if local_path(url).is_file() else "exists but is not a committed kdm artifact"
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
