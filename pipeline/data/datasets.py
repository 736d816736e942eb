"""Image datasets: an ImageFolder archive (``train|test/<class>/<file>``) or CIFAR-10's official python
release (``cifar-10-batches-py/`` pickled batches) -> a versioned Zarr v3 group of the same layout.

Which archive a named dataset uses (given, found in ``$KDM_DATA_DIR``, or downloaded): pipeline/data/sources.py;
the manifest records the published file it was (``source``).

Layout and manifest: storage_schemas/datasets.py. Order is deterministic: classes sorted by name (the
label is the index into the sorted names), files sorted by name within a class (the python release: the
batches' order within a class, data_batch_1..5 for train, test_batch for test). Images are decoded
with PIL and converted to RGB; every image must have the same size. The archive is read once,
sequentially (its compressed bytes are held in memory, then decoded chunk by chunk in sorted order).
The group is written under ``<url>.partial`` by one process, the manifest goes into the root
attributes last, then the directory is renamed to ``<url>``.
"""
from __future__ import annotations

import hashlib
import importlib
import io
import os
import pickle
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import zarr
from tqdm import tqdm
from zarr.codecs import Crc32cCodec, ZstdCodec

from storage_schemas import (DATASET_SPLITS, MANIFEST_KEY, ArraySpec, DatasetManifest, DatasetSplitInfo,
                             code_version, recipe_version, stable_hash, utc_now)

from pipeline.data import sources

from pipeline.storage import artifacts
from pipeline.errors import KDMError
from pipeline.storage.pairstore import open_group, open_manifest_group

CODECS = ("zstd(level=3)", "crc32c")
LAYOUT_HELP = "expected <split>/<class>/<file> with split 'train' or 'test' (ImageFolder layout)"


def dataset_version(source_sha256: str, chunk_size: int) -> str:
    return "ds-" + stable_hash(recipe_version(), "dataset-prepare", source_sha256, chunk_size)


def read_dataset_manifest(url: str) -> DatasetManifest:
    return ImageDataset.open(url).manifest


def source_text(m: DatasetManifest) -> str:
    """Which published file the dataset comes from, for every report that shows an FD."""
    if m.source is None:
        return f"{Path(m.source_uri).name} (sha256 {m.source_sha256}; source not recorded: prepared by an older version)"
    return m.source.text()


PYTHON_BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
_NUMPY_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                  ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                  ("numpy", "ndarray"), ("numpy", "dtype"),
                  ("_codecs", "encode")}        # bytes in a protocol-2 pickle written by Python 3


class _BatchUnpickler(pickle.Unpickler):
    """CIFAR-10's pickled batches hold dicts of lists, strings and numpy arrays: nothing else is loaded."""

    def find_class(self, module, name):
        if (module, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = module.replace("numpy.core", "numpy._core", 1)
        return getattr(importlib.import_module(module), name)


def _read_python_release(archive: str) -> tuple[tuple[str, ...], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(class names, {split: (images uint8 (N, 3, 32, 32), labels int32)}) of CIFAR-10's python release,
    labels as indices into the sorted class names, images ordered by class (stable: the batches' order)."""
    want = {f"{sources.PYTHON_RELEASE_DIR}/{n}" for ns in PYTHON_BATCHES.values() for n in ns}
    want.add(f"{sources.PYTHON_RELEASE_DIR}/batches.meta")
    raw: dict[str, dict] = {}
    fs, path = artifacts.url_to_fs(archive)
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for m in tar:
                name = m.name[2:] if m.name.startswith("./") else m.name
                if name in want and m.isfile():
                    try:
                        raw[name.split("/")[-1]] = _BatchUnpickler(tar.extractfile(m), encoding="latin1").load()
                    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
                        raise KDMError(f"{archive}: {name} is not a CIFAR-10 python batch ({e})") from None
    except (tarfile.TarError, OSError, EOFError) as e:
        raise KDMError(f"{archive} is truncated or corrupt ({type(e).__name__}: {e})") from None
    missing = sorted(n.split("/")[-1] for n in want if n.split("/")[-1] not in raw)
    if missing:
        raise KDMError(f"{archive} lacks {sources.PYTHON_RELEASE_DIR}/{{{','.join(missing)}}}: it is not a complete "
                       f"CIFAR-10 python release; download it again ({sources.CIFAR10_PYTHON.url})")
    names = tuple(str(n) for n in raw["batches.meta"].get("label_names", ()))
    if not names:
        raise KDMError(f"{archive}: batches.meta has no label_names")
    order = sorted(range(len(names)), key=lambda i: names[i])
    to_sorted = np.empty(len(names), dtype=np.int32)
    to_sorted[order] = np.arange(len(names), dtype=np.int32)
    out = {}
    for split, batches in PYTHON_BATCHES.items():
        xs, ys = [], []
        for b in batches:
            d = raw[b]
            data, labels = np.asarray(d.get("data")), np.asarray(d.get("labels"), dtype=np.int64)
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data) \
                    or (len(labels) and (labels.min() < 0 or labels.max() >= len(names))):
                raise KDMError(f"{archive}: {b} does not hold uint8 data (N, 3072) with N labels in "
                               f"0..{len(names) - 1}")
            xs.append(data.reshape(-1, 3, 32, 32))
            ys.append(to_sorted[labels])
        x, y = np.concatenate(xs), np.concatenate(ys).astype(np.int32)
        idx = np.argsort(y, kind="stable")
        out[split] = (np.ascontiguousarray(x[idx]), y[idx])
    return tuple(sorted(names)), out


def _read_archive(archive: str) -> dict[str, dict[str, list[tuple[str, bytes]]]]:
    """{split: {class: [(file name, bytes)]}} from one sequential pass over the archive."""
    members: dict[str, dict[str, list[tuple[str, bytes]]]] = {}
    fs, path = artifacts.url_to_fs(archive)
    try:
        f = fs.open(path, "rb")
    except FileNotFoundError:
        raise KDMError(f"archive {archive} does not exist") from None
    with f:
        try:
            tar = tarfile.open(fileobj=f, mode="r|*")
        except tarfile.TarError as e:
            raise KDMError(f"{archive} is not a (gzip-compressed) tar archive: {e}") from None
        try:
            for m in tar:
                name = m.name[2:] if m.name.startswith("./") else m.name
                if m.isdir() or name in ("", "."):
                    continue
                parts = name.split("/")
                if not m.isfile():
                    raise KDMError(f"{archive}: {name} is not a regular file (links and devices are not "
                                   f"supported); {LAYOUT_HELP}")
                if len(parts) != 3 or parts[0] not in DATASET_SPLITS or not parts[1] or not parts[2]:
                    raise KDMError(f"{archive}: unexpected path {name}; {LAYOUT_HELP}")
                data = tar.extractfile(m).read()
                members.setdefault(parts[0], {}).setdefault(parts[1], []).append((parts[2], data))
        except tarfile.TarError as e:
            raise KDMError(f"{archive} is truncated or corrupt ({e})") from None
        except (OSError, EOFError) as e:   # gzip CRC / truncated stream
            raise KDMError(f"{archive} is truncated or corrupt ({type(e).__name__}: {e})") from None
    if not members:
        raise KDMError(f"{archive} holds no images; {LAYOUT_HELP}")
    return members


def _decode(name: str, data: bytes) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            arr = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        reason = "not an image file PIL can identify" if isinstance(e, UnidentifiedImageError) else str(e)
        raise KDMError(f"cannot decode image {name} ({reason}); remove or replace it in the archive") from None
    return arr.transpose(2, 0, 1)   # (C, H, W)


def _split_hash(images_digest: str, label_digest: str, images_shape, label_shape) -> str:
    h = hashlib.sha256()
    h.update(f"images|uint8|{tuple(images_shape)}|{images_digest}|".encode())
    h.update(f"label|int32|{tuple(label_shape)}|{label_digest}".encode())
    return h.hexdigest()


def _combine(split_hashes: dict[str, str]) -> str:
    return stable_hash(sorted(split_hashes.items()), length=64)


def _create(group: zarr.Group, name: str, shape, chunks, dtype) -> zarr.Array:
    return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0,
                              compressors=[ZstdCodec(level=3), Crc32cCodec()])


def prepare_image_dataset(archive_path: str, out_url: str, *, chunk_size: int = 10_000, progress: bool = True,
                          threads: Optional[int] = None) -> DatasetManifest:
    """Convert an ImageFolder tar(.gz) archive, or CIFAR-10's python release, into the dataset group at
    ``out_url`` (no-op if present); the manifest records which published file it was."""
    if chunk_size < 1:
        raise KDMError(f"chunk_size must be >= 1, got {chunk_size}")
    t0 = time.time()
    try:
        digests = sources.file_digests(archive_path)
    except FileNotFoundError:
        raise KDMError(f"archive {archive_path} does not exist") from None
    source_sha = digests["sha256"]
    version = dataset_version(source_sha, chunk_size)
    if artifacts.check_target(out_url, version, read_dataset_manifest):
        return read_dataset_manifest(out_url)
    fmt = sources.archive_format(archive_path)
    # per split: (labels int32, block(start, stop) -> uint8 (n, C, H, W))
    splits: dict[str, tuple[np.ndarray, object]] = {}
    pool = None
    if fmt == "cifar10-python":
        classes, arrays = _read_python_release(archive_path)
        image_shape = tuple(arrays["train"][0].shape[1:])
        for split, (x, y) in arrays.items():
            splits[split] = (y, (lambda a, b, x=x: x[a:b]))
    else:
        members = _read_archive(archive_path)
        class_sets = {s: sorted(c) for s, c in members.items()}
        classes = sorted(set().union(*class_sets.values()))
        for s, cs in class_sets.items():
            missing = [c for c in classes if c not in cs]
            if missing:
                raise KDMError(f"{archive_path}: split {s!r} has no images of class(es) {missing}; every split needs "
                               f"the same classes")
        index = {c: i for i, c in enumerate(classes)}
        ordered = {s: [(f"{s}/{c}/{fn}", index[c], data) for c in classes for fn, data in sorted(members[s][c])]
                   for s in DATASET_SPLITS if s in members}
        first_name, first_bytes = ordered[next(iter(ordered))][0][0], ordered[next(iter(ordered))][0][2]
        image_shape = tuple(_decode(first_name, first_bytes).shape)
        cpus = os.cpu_count() or 1
        workers = threads or (1 if cpus <= 2 else min(8, cpus // 2))
        pool = ThreadPoolExecutor(workers) if workers > 1 else None

        def decode(batch):
            arrs = list(pool.map(lambda it: _decode(it[0], it[2]), batch)) if pool else \
                [_decode(it[0], it[2]) for it in batch]
            for (name, _, _), arr in zip(batch, arrs):
                if arr.shape != image_shape:
                    raise KDMError(f"{archive_path}: mixed image sizes: {first_name} is "
                                   f"{image_shape[2]}x{image_shape[1]} but {name} is {arr.shape[2]}x{arr.shape[1]} "
                                   f"(width x height); resize the images to one size first")
            return np.stack(arrs)

        for split, items in ordered.items():
            splits[split] = (np.array([lab for _, lab, _ in items], dtype=np.int32),
                             (lambda a, b, items=items: decode(items[a:b])))

    tmp = artifacts.begin(out_url, fresh=True)
    root = open_group(tmp, "w")
    root.attrs["kdm_status"] = "writing"
    total = sum(len(y) for y, _ in splits.values())
    bar = tqdm(total=total, desc="decode", unit="img", disable=not progress, mininterval=1.0)
    infos: dict[str, DatasetSplitInfo] = {}
    try:
        for split, (labels, block_of) in splits.items():
            n = len(labels)
            g = root.create_group(split)
            c = max(1, min(chunk_size, n))
            images = _create(g, "images", (n, *image_shape), (c, *image_shape), "uint8")
            labels_arr = _create(g, "label", (n,), (c,), "int32")
            h_img, h_lab = hashlib.sha256(), hashlib.sha256()
            for s in range(0, n, c):
                block = np.ascontiguousarray(block_of(s, min(s + c, n)), dtype=np.uint8)
                images[s:s + len(block)] = block
                h_img.update(block.tobytes())
                bar.update(len(block))
            labels_arr[:] = labels
            h_lab.update(labels.astype("<i4").tobytes())
            hist = np.bincount(labels, minlength=len(classes)).tolist()
            infos[split] = DatasetSplitInfo(
                count=n, label_histogram=tuple(hist),
                arrays={"images": ArraySpec(shape=(n, *image_shape), dtype="uint8", chunks=(c, *image_shape),
                                            codecs=CODECS),
                        "label": ArraySpec(shape=(n,), dtype="int32", chunks=(c,), codecs=CODECS)},
                content_hash=_split_hash(h_img.hexdigest(), h_lab.hexdigest(), (n, *image_shape), (n,)))
    except KDMError:
        artifacts.discard(out_url)         # a refused archive leaves nothing behind (preparation restarts anyway)
        raise
    finally:
        if pool is not None:
            pool.shutdown()
        bar.close()
    source = sources.source_record(archive_path, fmt, source_sha, digests["md5"])
    manifest = DatasetManifest(
        version=version, class_names=tuple(classes), image_shape=image_shape, splits=infos, chunk_size=chunk_size,
        source_uri=str(archive_path), source_sha256=source_sha, source=source,
        content_hash=_combine({s: i.content_hash for s, i in infos.items()}),
        prepare_seconds=round(time.time() - t0, 3), code_version=code_version(), created=utc_now())
    attrs = {MANIFEST_KEY: manifest.model_dump(mode="json"),
             "description": (f"kdm image dataset: child groups {', '.join(infos)} with images (uint8, N x C x H x W) "
                             f"and label (int32, index into class_names), from {source.description}; manifest "
                             f"under attribute '{MANIFEST_KEY}'")}
    root.attrs.clear()
    root.attrs.update(attrs)
    artifacts.commit(out_url)
    return manifest


@dataclass
class ImageSplit:
    images: zarr.Array   # uint8 (N, C, H, W)
    labels: zarr.Array   # int32 (N,)

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class ImageDataset:
    """A committed image dataset: ``ds.splits['train'].images[...]``, ``ds.load('train')``."""

    url: str
    group: zarr.Group
    manifest: DatasetManifest

    @classmethod
    def open(cls, url: str) -> "ImageDataset":
        g, manifest = open_manifest_group(url, DatasetManifest, "dataset", writer="kdm dataset prepare")
        return cls(str(url), g, manifest)

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def splits(self) -> dict[str, ImageSplit]:
        return {s: ImageSplit(self.group[s]["images"], self.group[s]["label"]) for s in self.manifest.splits}

    def split(self, name: str) -> ImageSplit:
        if name not in self.manifest.splits:
            raise KDMError(f"{self.url} has no split {name!r} (splits: {', '.join(self.manifest.splits)})")
        return ImageSplit(self.group[name]["images"], self.group[name]["label"])

    def load(self, name: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """(images uint8 (N, C, H, W), labels int32 (N,)) of one split, in memory."""
        s = self.split(name)
        return s.images[:], s.labels[:]

    def verify(self) -> None:
        for name, info in self.manifest.splits.items():
            s = self.split(name)
            h_img, h_lab = hashlib.sha256(), hashlib.sha256()
            step = max(1, self.manifest.chunk_size)
            for a in range(0, len(s), step):
                h_img.update(np.ascontiguousarray(s.images[a:a + step]).tobytes())
            h_lab.update(s.labels[:].astype("<i4").tobytes())
            actual = _split_hash(h_img.hexdigest(), h_lab.hexdigest(), s.images.shape, s.labels.shape)
            if actual != info.content_hash:
                raise KDMError(f"{self.url}: split {name!r} content hash mismatch (manifest {info.content_hash[:16]}, "
                               f"data {actual[:16]}): the dataset is corrupt or was modified")


def open_image_dataset(url: str) -> ImageDataset:
    """Open a committed dataset; its arrays are ``.splits[name].images`` / ``.labels`` (or ``.load(name)``)."""
    return ImageDataset.open(url)
