"""Import external pairs into a pair store, and export a store in the official KDM per-pair format.

Formats (``PairsImportConfig.format``):

``kdm-trajectories``
    The official KDM checkerboard file: one ``.npy`` float32 array (T, N, D) of teacher-ODE snapshots,
    x_T = [0], x_0 = [-1]. x_T is unit noise (x_T_scale 1). With ``snapshots`` ('all' or indices) the
    entries between are kept as the store's trajectory snapshots (array ``x_t``), at the flow-matching
    times t = i / (T - 1) of the official file (its ODE solver returned its states on linspace(0, 1, T)).
``kdm-npz``
    The official KDM image data: a folder with one ``.npz`` per pair (``path<i>.npz``), float64 (any float
    is accepted). Unconditional files hold ``arr_0`` with shape (K >= 2, C, H, W): the pair is its first
    and last entry, in the order given by the required option ``order`` ('xT-first' in the official
    CIFAR-10 unconditional training set, 'x0-first' in every other set); conditional files hold
    ``endpoints`` (2, C, H, W) in the same sense plus ``label`` (one-hot, length = number of classes).
    x_T is stored as found: the official sets already hold x_T = 80 * eps (``noise_scale``, default 80,
    is recorded as x_T_scale).
``npz``
    What users of other samplers export: one ``.npz`` holding arrays ``x_T`` and ``x_0`` of the same shape
    (N, C, H, W) (any (N, ...) works), optionally ``seed`` (N,) integers (stored as the pairs' seeds;
    default: the index) and ``label`` (N,) class indices (-1 = none) or (N, K) one-hot. x_T is stored as
    found; ``noise_scale`` (default 80) is recorded as its x_T_scale. Read with ``allow_pickle=False``.
``get-pt``
    GET's published pairs (locuslab/get data/generate.py): a folder with ``latent/`` and ``image/``, each
    holding ``torch.save`` files named by the last seed they cover (``<int>.pkl`` or ``.pt``), paired by
    name and taken in numeric order. An image file is a float tensor (n, C, H, W); a latent file is a
    tensor (n, C, H, W) of *unit* noise, or for conditional sets a list [latents, one-hot labels (n, K)].
    x_T = noise_scale * latent (default 80, EDM's sigma_max). Files are read with
    ``torch.load(weights_only=True)``: tensors and lists only, no code.

Files are taken in a deterministic order (natural sort of the names); the ``seed`` array holds each
pair's index in that order (the official files do not record seeds). The train/held-out split is a
permutation drawn from ``split_seed``. The source digest (``source_sha256``) of a folder is the sha256
over the sorted (relative name, file sha256) list, so the version is content-addressed.

Export (``export_kdm_npz``) writes a split of a store as per-pair ``path<i>.npz`` files readable by the
official loaders: ``arr_0`` = stack of the pair in the chosen ``order`` (unconditional) or ``endpoints`` +
one-hot ``label`` (conditional), float32 unless ``dtype`` says otherwise.
"""
from __future__ import annotations

import abc

import hashlib
import io
import logging
import re
import zipfile
from collections import OrderedDict
from typing import Callable, Optional

import numpy as np

from storage_schemas import (HELDOUT_GROUP, ImportInfo, PairsImportConfig, code_version, recipe_version,
                             VersionInputs, utc_now)

from pipeline.storage import artifacts
from pipeline.storage.manifests import holds_pair_store
from pipeline.errors import ArtifactExists, KDMError

log = logging.getLogger("kdm.import")

GET_SUFFIXES = (".pkl", ".pt", ".pth")


# --- kdm-trajectories ----------------------------------------------------------------------------------

def load_trajectories(src: str) -> tuple[np.ndarray, str]:
    try:
        raw = artifacts.read_bytes(src)
    except FileNotFoundError:
        raise KDMError(f"import source {src} does not exist") from None
    except IsADirectoryError:
        raise KDMError(f"{src} is a folder; format kdm-trajectories is one .npy file (folders: kdm-npz, get-pt)") from None
    if not raw.startswith(b"\x93NUMPY"):
        raise KDMError(f"{src} is not a .npy file (no NumPy header); format kdm-trajectories is one float32 "
                       f"(T, N, D) array saved with numpy.save")
    try:
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
    except ValueError as e:
        raise KDMError(f"{src} is not a plain .npy array ({e})") from None
    if not isinstance(arr, np.ndarray) or arr.ndim != 3 or arr.shape[0] < 2:
        shape = getattr(arr, "shape", type(arr).__name__)
        raise KDMError(f"{src}: format kdm-trajectories expects a (T, N, D) array with T >= 2, got {shape}")
    return arr, artifacts.sha256_bytes(raw)


def split_indices(n: int, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_hold = int(round(n * holdout_fraction))
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


# --- folders -------------------------------------------------------------------------------------------

def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _list_files(folder: str, suffixes: tuple[str, ...]) -> list[str]:
    """Names (relative to ``folder``) of the files with one of ``suffixes``, naturally sorted."""
    fs, path = artifacts.url_to_fs(folder)
    if not fs.isdir(path):
        raise KDMError(f"import source {folder} is not a folder")
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    return sorted((n for n in names if n.endswith(suffixes)), key=_natural_key)


def folder_digest(folder: str, names: list[str]) -> str:
    h = hashlib.sha256()
    for n in names:
        h.update(f"{n}\0{artifacts.sha256_file(artifacts.join(folder, n))}\n".encode())
    return h.hexdigest()


class _Source(abc.ABC):
    """Random access to the pairs of a folder source: ``get(indices) -> (x_T, x_0, label)``."""

    count: int
    sample_shape: tuple[int, ...]
    num_classes: int
    sha256: str

    @abc.abstractmethod
    def get(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The pairs at ``idx`` (sorted source indices)."""

    def seeds(self, idx: np.ndarray) -> np.ndarray:
        """The seeds stored for the pairs at ``idx``: their index in the source unless it records seeds."""
        return np.asarray(idx, dtype=np.int64)

    def snapshot_spec(self):
        """The ``storage_schemas.Snapshots`` this source keeps, or None (pairs only)."""
        return None

    def snapshots(self, idx: np.ndarray) -> Optional[np.ndarray]:
        """(len(idx), K, *sample_shape) intermediate states of the pairs at ``idx`` (None: no snapshots)."""
        return None


class _NpzSource(_Source):
    def __init__(self, folder: str, order: str, sha256: Optional[str] = None):
        self.folder, self.order = folder, order
        self.names = _list_files(folder, (".npz",))
        if not self.names:
            raise KDMError(f"{folder} holds no .npz files (format kdm-npz: one path<i>.npz per pair)")
        self.sha256 = sha256 or folder_digest(folder, self.names)
        self.count = len(self.names)
        x_T, x_0, lab, k = self._read(0)
        self.sample_shape, self.num_classes = x_0.shape, k

    def _read(self, i: int):
        name = self.names[i]
        try:
            with np.load(io.BytesIO(artifacts.read_bytes(artifacts.join(self.folder, name))), allow_pickle=False) as z:
                keys = set(z.files)
                if "endpoints" in keys:
                    ends = z["endpoints"]
                    if "label" not in keys:
                        raise KDMError(f"{name}: 'endpoints' without 'label' (conditional kdm-npz files hold both)")
                    onehot = np.asarray(z["label"]).reshape(-1)
                    label, k = int(np.argmax(onehot)), onehot.shape[0]
                elif "arr_0" in keys:
                    ends, label, k = z["arr_0"], -1, 0
                else:
                    raise KDMError(f"{name}: no 'arr_0' or 'endpoints' (keys: {', '.join(sorted(keys))})")
        except (ValueError, OSError, EOFError) as e:
            raise KDMError(f"cannot read {artifacts.join(self.folder, name)}: {e}") from None
        if ends.ndim < 2 or ends.shape[0] < 2:
            raise KDMError(f"{name}: expected (K >= 2, *sample_shape), got shape {ends.shape}")
        first, last = ends[0], ends[-1]
        x_T, x_0 = (first, last) if self.order == "xT-first" else (last, first)
        return x_T, x_0, label, k

    def get(self, idx):
        x_T = np.empty((len(idx), *self.sample_shape), np.float32)
        x_0 = np.empty_like(x_T)
        lab = np.empty(len(idx), np.int32)
        for j, i in enumerate(idx):
            a, b, lab[j], k = self._read(int(i))
            if b.shape != self.sample_shape or k != self.num_classes:
                raise KDMError(f"{self.names[i]}: sample shape {b.shape} / {k} classes differ from {self.names[0]} "
                               f"({self.sample_shape} / {self.num_classes} classes)")
            x_T[j], x_0[j] = a, b
        return x_T, x_0, lab


def _torch_load(url: str):
    import torch
    try:
        if artifacts.is_local(url):
            try:
                return torch.load(str(artifacts.local_path(url)), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:   # legacy (non-zip) serialization cannot be memory-mapped
                pass
        return torch.load(io.BytesIO(artifacts.read_bytes(url)), map_location="cpu", weights_only=True)
    except Exception as e:   # weights_only refuses anything but tensors and containers
        raise KDMError(f"cannot read {url} as tensors (torch.load weights_only): {type(e).__name__}: {e}") from None


class _GetSource(_Source):
    def __init__(self, folder: str, scale: float, sha256: Optional[str] = None):
        self.folder, self.scale = folder, scale
        lat_dir, img_dir = artifacts.join(folder, "latent"), artifacts.join(folder, "image")
        for d in (lat_dir, img_dir):
            if not artifacts.exists(d):
                raise KDMError(f"{folder}: format get-pt needs the sub-folders latent/ and image/ ({d} is missing)")
        lat, img = _list_files(lat_dir, GET_SUFFIXES), _list_files(img_dir, GET_SUFFIXES)
        if not lat:
            raise KDMError(f"{lat_dir} holds no {'/'.join(GET_SUFFIXES)} files")
        if lat != img:
            only = sorted(set(lat) ^ set(img))
            raise KDMError(f"{folder}: latent/ and image/ hold different files (e.g. {only[:3]}); they pair by name")
        self.names = lat
        self.sha256 = sha256 or folder_digest(folder, [f"latent/{n}" for n in lat] + [f"image/{n}" for n in img])
        self.sizes = []
        self._cache: "OrderedDict[int, tuple]" = OrderedDict()
        for f in range(len(lat)):
            x_T, x_0, lab, k = self._file(f)
            self.sizes.append(len(x_0))
            if f == 0:
                self.sample_shape, self.num_classes = tuple(x_0.shape[1:]), k
            elif tuple(x_0.shape[1:]) != self.sample_shape or k != self.num_classes:
                raise KDMError(f"{self.names[f]}: sample shape {tuple(x_0.shape[1:])} / {k} classes differ from "
                               f"{self.names[0]} ({self.sample_shape} / {self.num_classes} classes)")
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)])
        self.count = int(self.starts[-1])

    def _file(self, f: int):
        import torch
        if f in self._cache:
            self._cache.move_to_end(f)
            return self._cache[f]
        name = self.names[f]
        lat = _torch_load(artifacts.join(self.folder, "latent", name))
        img = _torch_load(artifacts.join(self.folder, "image", name))
        if isinstance(lat, (list, tuple)):
            if len(lat) != 2:
                raise KDMError(f"latent/{name}: a list must be [latents, one-hot labels], got {len(lat)} entries")
            lat, onehot = lat
            onehot = torch.as_tensor(onehot)
            lab, k = onehot.argmax(dim=1).numpy().astype(np.int32), onehot.shape[1]
        else:
            lab, k = None, 0
        if not (torch.is_tensor(lat) and torch.is_tensor(img)):
            raise KDMError(f"{name}: expected tensors in latent/ and image/")
        if lat.shape != img.shape or lat.dim() < 2:
            raise KDMError(f"{name}: latent shape {tuple(lat.shape)} and image shape {tuple(img.shape)} differ")
        if lab is None:
            lab = np.full(len(img), -1, np.int32)
        entry = (lat, img, lab, k)
        self._cache[f] = entry
        while len(self._cache) > 2:
            self._cache.popitem(last=False)
        return entry

    def get(self, idx):
        import torch
        x_T = np.empty((len(idx), *self.sample_shape), np.float32)
        x_0 = np.empty_like(x_T)
        lab = np.empty(len(idx), np.int32)
        files = np.searchsorted(self.starts, idx, side="right") - 1
        for f in np.unique(files):
            sel = np.nonzero(files == f)[0]
            lat, img, lb, _ = self._file(int(f))
            off = torch.as_tensor(idx[sel] - self.starts[f])
            x_T[sel] = (lat[off].to(torch.float64) * self.scale).to(torch.float32).numpy()
            x_0[sel] = img[off].to(torch.float32).numpy()
            lab[sel] = lb[off.numpy()]
        return x_T, x_0, lab


class _ArraySource(_Source):
    def __init__(self, src: str, snapshots=None):
        arr, self.sha256 = load_trajectories(src)
        self.x_T, self.x_0 = arr[0].astype(np.float32), arr[-1].astype(np.float32)
        self.count, self.sample_shape, self.num_classes = arr.shape[1], tuple(arr.shape[2:]), 0
        steps = arr.shape[0] - 1
        self.keep: tuple[int, ...] = ()
        if snapshots is not None:
            self.keep = tuple(range(1, steps)) if snapshots == "all" else tuple(snapshots)
            if not self.keep or max(self.keep) >= steps:
                raise KDMError(f"{src} holds trajectories of {steps + 1} entries (x_T = 0, x_0 = {steps}); "
                               f"snapshots {'all' if snapshots == 'all' else list(snapshots)} must be indices in "
                               f"[1, {steps - 1}]")
            # (N, K, D), in sampling order; the array is small enough (the official file: 4 MB) to hold
            self.x_t = np.ascontiguousarray(arr[list(self.keep)].transpose(1, 0, *range(2, arr.ndim)), np.float32)
        self.steps = steps

    def get(self, idx):
        return self.x_T[idx], self.x_0[idx], np.full(len(idx), -1, np.int32)

    def snapshot_spec(self):
        if not self.keep:
            return None
        from storage_schemas import Snapshots
        return Snapshots(count=len(self.keep), axis="flow-matching-time", x_T_level=0.0,
                         levels=tuple(i / self.steps for i in self.keep), source_index=self.keep)

    def snapshots(self, idx):
        return self.x_t[idx] if self.keep else None


class _NpzArraysSource(_Source):
    """One .npz with x_T, x_0 (N, ...) and optionally seed (N,), label (N,) or one-hot (N, K)."""

    def __init__(self, src: str):
        try:
            raw = artifacts.read_bytes(src)
        except FileNotFoundError:
            raise KDMError(f"import source {src} does not exist") from None
        except IsADirectoryError:
            raise KDMError(f"{src} is a folder; format npz is one .npz file with arrays x_T and x_0 (a folder of "
                           f"path<i>.npz files: format kdm-npz)") from None
        self.sha256 = artifacts.sha256_bytes(raw)
        try:
            with np.load(io.BytesIO(raw), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise KDMError(f"{src} is not a .npz file numpy can read without pickles ({e}); format npz is "
                           f"numpy.savez(path, x_T=..., x_0=..., [seed=...], [label=...])") from None
        missing = [k for k in ("x_T", "x_0") if k not in arrays]
        if missing:
            raise KDMError(f"{src}: format npz needs arrays x_T and x_0 (N, C, H, W); missing {', '.join(missing)} "
                           f"(arrays: {', '.join(sorted(arrays)) or 'none'})")
        x_T, x_0 = arrays["x_T"], arrays["x_0"]
        for name, a in (("x_T", x_T), ("x_0", x_0)):
            if a.dtype.kind not in "fiu" or a.ndim < 2:
                raise KDMError(f"{src}: {name} must be a numeric (N, C, H, W) array, got {a.dtype} {a.shape}")
        if x_T.shape != x_0.shape:
            raise KDMError(f"{src}: x_T {x_T.shape} and x_0 {x_0.shape} differ in shape; both are (N, C, H, W)")
        n = len(x_0)
        self.x_T, self.x_0 = x_T.astype(np.float32, copy=False), x_0.astype(np.float32, copy=False)
        self.count, self.sample_shape = n, tuple(x_0.shape[1:])
        self._seeds = None
        if "seed" in arrays:
            seed = arrays["seed"]
            if seed.dtype.kind not in "iu" or seed.shape != (n,) or (n and (seed.min() < 0 or
                                                                           seed.max() > np.iinfo(np.int64).max)):
                raise KDMError(f"{src}: seed must be (N,) = ({n},) non-negative integers, got {seed.dtype} {seed.shape}")
            self._seeds = seed.astype(np.int64)
        self.labels, self.num_classes = np.full(n, -1, np.int32), 0
        if "label" in arrays:
            lab = arrays["label"]
            if lab.ndim == 2 and lab.shape[0] == n and lab.shape[1] >= 1:    # one-hot (N, K)
                self.labels, self.num_classes = lab.argmax(axis=1).astype(np.int32), int(lab.shape[1])
            elif lab.shape == (n,) and lab.dtype.kind in "iu" and (n == 0 or lab.min() >= -1):
                self.labels = lab.astype(np.int32)
                self.num_classes = int(self.labels.max()) + 1 if n and self.labels.max() >= 0 else 0
            else:
                raise KDMError(f"{src}: label must be (N,) = ({n},) class indices (-1 = none) or (N, K) one-hot, "
                               f"got {lab.dtype} {lab.shape}")
        unknown = sorted(set(arrays) - {"x_T", "x_0", "seed", "label"})
        if unknown:
            log.warning("%s: arrays %s are not imported (format npz reads x_T, x_0, seed, label)", src,
                        ", ".join(unknown))

    def get(self, idx):
        return self.x_T[idx], self.x_0[idx], self.labels[idx]

    def seeds(self, idx):
        return self._seeds[idx] if self._seeds is not None else super().seeds(idx)


def open_source(src: str, cfg: PairsImportConfig, sha256: Optional[str] = None) -> _Source:
    if cfg.format == "kdm-trajectories":
        return _ArraySource(src, cfg.snapshots)
    if cfg.format == "npz":
        return _NpzArraysSource(src)
    if cfg.format == "kdm-npz":
        return _NpzSource(src, cfg.order, sha256)
    return _GetSource(src, cfg.x_T_scale, sha256)


def source_digest(src: str, cfg: PairsImportConfig) -> str:
    """sha256 of a file source, or of a folder source's sorted (name, sha256) list."""
    if cfg.format in ("kdm-trajectories", "npz"):
        return artifacts.sha256_file(src)
    if cfg.format == "kdm-npz":
        return folder_digest(src, _list_files(src, (".npz",)))
    for d in ("latent", "image"):
        if not artifacts.exists(artifacts.join(src, d)):
            raise KDMError(f"{src}: format get-pt needs the sub-folders latent/ and image/ "
                           f"({artifacts.join(src, d)} is missing)")
    lat = _list_files(artifacts.join(src, "latent"), GET_SUFFIXES)
    img = _list_files(artifacts.join(src, "image"), GET_SUFFIXES)
    return folder_digest(src, [f"latent/{n}" for n in lat] + [f"image/{n}" for n in img])


def _version_inputs(sha: str, cfg: PairsImportConfig) -> VersionInputs:
    return VersionInputs.of("import", recipe_version(), "import", sha, cfg)


def _version(sha: str, cfg: PairsImportConfig) -> str:
    return _version_inputs(sha, cfg).version


def import_version(src: str, cfg: PairsImportConfig) -> str:
    """The version ``import_pairs(src, cfg, ...)`` produces (reads every source file once to hash it)."""
    return _version(source_digest(src, cfg), cfg)


# --- import --------------------------------------------------------------------------------------------

def _chunks_per_write(out: str, chunk_size: int, sample_shape) -> int:
    """Whole chunks per write: on an object store several (Zarr uploads a write's chunks at once), within
    about 64 MiB of x_T and x_0; one on local disks."""
    if artifacts.is_local(out):
        return 1
    row = 8 * int(np.prod(sample_shape, dtype=np.int64))
    return int(max(1, min(artifacts.IO_WORKERS, (64 << 20) // max(1, chunk_size * row))))


def import_pairs(src: str, cfg: PairsImportConfig, out: str) -> str:
    """Import ``src`` (format ``cfg.format``) into the pair store at ``out``; returns its version."""
    source_sha = None
    if cfg.format not in ("kdm-trajectories", "npz"):   # folders: hash first, so an existing version costs no decoding
        if not artifacts.exists(src):
            raise KDMError(f"import source {src} does not exist")
        source_sha = source_digest(src, cfg)
        if holds_pair_store(out, _version(source_sha, cfg)):
            return _version(source_sha, cfg)
    source = open_source(src, cfg, source_sha)
    if source.count == 0 or 0 in tuple(source.sample_shape):
        raise KDMError(f"{src} holds no pairs (count {source.count}, sample shape {tuple(source.sample_shape)}); "
                       f"nothing to import")
    version = _version(source.sha256, cfg)
    if holds_pair_store(out, version):
        return version
    from pipeline.storage import pairstore     # Zarr: after the source is checked (a fast error exit)
    train_idx, held_idx = split_indices(source.count, cfg.holdout_fraction, cfg.split_seed)
    info = ImportInfo(format=cfg.format, source_uri=str(src), source_sha256=source.sha256,
                      holdout_fraction=cfg.holdout_fraction, split_seed=cfg.split_seed, order=cfg.order,
                      x_T_multiplier=cfg.x_T_scale if cfg.format == "get-pt" else None)
    tmp = artifacts.begin(out, fresh=True)
    splits = [("train", tmp, train_idx)]
    if len(held_idx):
        splits.append(("heldout", artifacts.join(tmp, HELDOUT_GROUP), held_idx))
    groups = []
    c = cfg.chunk_size
    nonfinite = {"train": 0, "heldout": 0}
    snap = source.snapshot_spec()
    for split, url, idx in splits:          # root first: creating it would wipe an existing child
        group = pairstore.create_arrays(url, len(idx), source.sample_shape, c, snapshots=snap.count if snap else 0)
        step = c * _chunks_per_write(out, c, source.sample_shape)
        for s in range(0, len(idx), step):
            x_T, x_0, lab = source.get(idx[s:s + step])
            rows = {"x_T": x_T, "x_0": x_0, "label": lab, "seed": source.seeds(idx[s:s + step])}
            if snap is not None:
                rows["x_t"] = source.snapshots(idx[s:s + step])
            nonfinite[split] += int((~np.all([np.isfinite(np.reshape(rows[k], (len(x_0), -1))).all(1)
                                              for k in ("x_T", "x_0", "x_t") if k in rows], axis=0)).sum())
            pairstore.write_region(group, s, rows)
        groups.append((split, group))
    for split, group in reversed(groups):   # the root manifest is the last write
        pairstore.finalize(group, version=version if split == "train" else f"{version}-heldout", split=split,
                           origin="import", chunk_size=c, import_info=info, x_T_scale=cfg.x_T_scale, snapshots=snap,
                           version_inputs=_version_inputs(source.sha256, cfg),
                           num_classes=source.num_classes, code_version=code_version(), created=utc_now())
    artifacts.commit(out)
    if any(nonfinite.values()):
        log.warning("%s: %d train and %d held-out pairs hold NaN/Inf (imported as they are); drop them with "
                    "`kdm pairs filter --pairs %s --out NEW` before training", out, nonfinite["train"],
                    nonfinite["heldout"], out)
    return version


# --- export --------------------------------------------------------------------------------------------

def export_kdm_npz(pairs_url: str, out_dir: str, *, order: str = "x0-first", split: str = "train",
                   dtype: str = "float32", compress: bool = True,
                   on_chunk: Optional[Callable[[int, int], None]] = None) -> int:
    """Write one split of a pair store as official per-pair files ``<out_dir>/path<i>.npz``; returns the count.

    ``order``: 'x0-first' ([x_0, x_T], every official loader but the CIFAR-10 unconditional training set)
    or 'xT-first'. Conditional stores write ``endpoints`` + one-hot ``label`` (float32), others ``arr_0``.
    ``i`` is the row in the store. The folder is written as ``<out_dir>.partial`` and renamed when done.
    """
    from pipeline.storage.pairstore import PairStore
    if order not in ("x0-first", "xT-first"):
        raise KDMError(f"order must be 'x0-first' or 'xT-first', got {order!r}")
    if artifacts.exists(out_dir):
        raise ArtifactExists(f"{out_dir} exists; export into a new folder")
    store = PairStore.open(pairs_url)
    if split == "heldout":
        store = store.heldout()
        if store is None:
            raise KDMError(f"{pairs_url} has no held-out split")
    elif split != "train":
        raise KDMError(f"split must be 'train' or 'heldout', got {split!r}")
    k = store.manifest.num_classes
    tmp = artifacts.begin(out_dir, fresh=True)
    eye = np.eye(k, dtype=np.float32) if k else None
    save = np.savez_compressed if compress else np.savez
    n_chunks = (len(store) + store.manifest.chunk_size - 1) // store.manifest.chunk_size
    for ci, (start, data) in enumerate(store.iter_chunks(("x_T", "x_0", "label"))):
        for j in range(len(data["x_0"])):
            a, b = data["x_0"][j], data["x_T"][j]
            pair = np.stack([a, b] if order == "x0-first" else [b, a]).astype(dtype)
            buf = io.BytesIO()
            if eye is not None:
                save(buf, endpoints=pair, label=eye[int(data["label"][j])])
            else:
                save(buf, pair)
            artifacts.write_bytes(artifacts.join(tmp, f"path{start + j}.npz"), buf.getvalue())
        if on_chunk is not None:
            on_chunk(ci, n_chunks)
    artifacts.commit(out_dir)
    return len(store)
