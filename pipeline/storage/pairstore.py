"""Pair stores: Zarr v3 groups of (x_T, x_0, label, seed) at any fsspec URL.

Layout (see storage_schemas.pairs): arrays at the group root, chunked along N, zstd + crc32c; the
manifest in the group attribute ``kdm``; an optional held-out split in the child group ``heldout``.
Arrays are sized once, up front; writers fill whole chunks (Zarr 3 loses data under concurrent
appends or partial-chunk writes from several processes).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Type, TypeVar

import numpy as np
import zarr
from pydantic import BaseModel, ValidationError
from zarr.codecs import Crc32cCodec, ZstdCodec

from storage_schemas import (HELDOUT_GROUP, MANIFEST_KEY, PAIR_ARRAYS, ArraySpec, PairStoreManifest,
                             format_validation_error)

from pipeline.storage import artifacts
from pipeline.errors import ArtifactMissing, KDMError

CODECS = ("zstd(level=3)", "crc32c")
WRITING_KEY = "kdm_writing"   # group attribute: the version an unfinished writer is producing
M = TypeVar("M", bound=BaseModel)
DTYPES = {"x_T": "float32", "x_0": "float32", "label": "int32", "seed": "int64", "source_index": "int64"}


def _store(url: str, read_only: bool = False):
    if artifacts.is_local(url):
        return zarr.storage.LocalStore(str(artifacts.local_path(url)), read_only=read_only)
    return zarr.storage.FsspecStore.from_url(str(url), read_only=read_only)


def open_group(url: str, mode: str = "r") -> zarr.Group:
    return zarr.open_group(_store(url, read_only=(mode == "r")), mode=mode, zarr_format=3)


def open_manifest_group(url: str, manifest_model: Type[M], what: str, writer: str = "kdm") -> tuple[zarr.Group, M]:
    """A committed kdm Zarr group (read-only) and its manifest (root attribute ``kdm``) as ``manifest_model``.

    ``what`` names the artifact kind ('pair store') and ``writer`` the command that writes it, for the
    ArtifactMissing / KDMError messages.
    """
    try:
        g = open_group(url, "r")
    except FileNotFoundError:
        raise ArtifactMissing(f"no {what} at {url} (expected a Zarr v3 group written by {writer})") from None
    raw = g.attrs.get(MANIFEST_KEY)
    if raw is None:
        raise ArtifactMissing(f"{url} is a Zarr group without a kdm manifest: it is incomplete or not a kdm {what}")
    try:
        manifest = manifest_model.model_validate(raw)
    except ValidationError as e:
        raise KDMError(format_validation_error(e, f"{url} (attribute '{MANIFEST_KEY}')")) from None
    return g, manifest


def create_arrays(url: str, count: int, sample_shape: tuple[int, ...], chunk_size: int,
                  extra: Iterable[str] = ()) -> zarr.Group:
    """Create the group and its arrays, fully sized, at ``url`` (overwriting what is there)."""
    g = zarr.open_group(_store(url), mode="w", zarr_format=3)
    names = list(PAIR_ARRAYS) + list(extra)
    for name in names:
        shape = (count, *sample_shape) if name in ("x_T", "x_0") else (count,)
        chunks = (max(1, min(chunk_size, count)), *shape[1:])
        g.create_array(name, shape=shape, chunks=chunks, dtype=DTYPES[name], fill_value=0,
                       compressors=[ZstdCodec(level=3), Crc32cCodec()])
    g.attrs["kdm_status"] = "writing"
    return g


def write_region(group: zarr.Group, start: int, data: dict[str, np.ndarray]) -> None:
    n = None
    for name, arr in data.items():
        arr = np.ascontiguousarray(arr, dtype=DTYPES[name])
        if n is None:
            n = arr.shape[0]
        elif arr.shape[0] != n:
            raise ValueError(f"region arrays disagree in length: {name} has {arr.shape[0]}, expected {n}")
        group[name][start:start + n] = arr


def content_hash(group: zarr.Group, names: Optional[Iterable[str]] = None, block: int = 65536) -> str:
    """sha256 over (name, dtype, shape, raw little-endian bytes) of each array, PAIR_ARRAYS first."""
    if names is None:
        present = set(group.array_keys())
        names = [n for n in PAIR_ARRAYS if n in present] + sorted(present - set(PAIR_ARRAYS))
    h = hashlib.sha256()
    for name in names:
        a = group[name]
        h.update(f"{name}|{a.dtype}|{a.shape}|".encode())
        for s in range(0, a.shape[0], block):
            h.update(np.ascontiguousarray(a[s:s + block]).astype(a.dtype.newbyteorder("<")).tobytes())
    return h.hexdigest()


def array_specs(group: zarr.Group) -> dict[str, ArraySpec]:
    return {name: ArraySpec(shape=tuple(a.shape), dtype=str(a.dtype), chunks=tuple(a.chunks), codecs=CODECS)
            for name, a in sorted(group.arrays())}


def finalize(group: zarr.Group, **manifest_fields) -> PairStoreManifest:
    """Compute the content hash, validate and write the manifest (the last write of a store)."""
    fields = dict(manifest_fields)
    fields["content_hash"] = content_hash(group)
    fields["arrays"] = array_specs(group)
    fields["count"] = group["x_0"].shape[0]
    fields["sample_shape"] = tuple(group["x_0"].shape[1:])
    manifest = PairStoreManifest(**fields)
    attrs = dict(group.attrs)
    attrs.pop("kdm_status", None)
    attrs.pop(WRITING_KEY, None)
    attrs[MANIFEST_KEY] = manifest.model_dump(mode="json")
    attrs["description"] = (f"kdm pair store ({manifest.split}, {manifest.count} pairs): arrays x_T, x_0 "
                            f"(float32, (N, *sample_shape)), label (int32, -1 = unconditional), seed "
                            f"(int64); manifest under attribute '{MANIFEST_KEY}'")
    group.attrs.clear()
    group.attrs.update(attrs)
    return manifest


@dataclass
class PairStore:
    """A committed pair store (or its held-out child group)."""

    url: str
    group: zarr.Group
    manifest: PairStoreManifest

    @classmethod
    def open(cls, url: str) -> "PairStore":
        g, manifest = open_manifest_group(url, PairStoreManifest, "pair store")
        return cls(str(url), g, manifest)

    @property
    def version(self) -> str:
        return self.manifest.version

    def __len__(self) -> int:
        return self.manifest.count

    def heldout(self) -> Optional["PairStore"]:
        if HELDOUT_GROUP not in set(self.group.group_keys()):
            return None
        return PairStore.open(artifacts.join(self.url, HELDOUT_GROUP))

    def load(self, names: Iterable[str] = PAIR_ARRAYS) -> dict[str, np.ndarray]:
        return {n: self.group[n][:] for n in names}

    def iter_chunks(self, names: Iterable[str] = PAIR_ARRAYS) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        names = list(names)
        c = self.manifest.chunk_size
        for s in range(0, len(self), c):
            yield s, {n: self.group[n][s:s + c] for n in names}

    def verify(self) -> None:
        actual = content_hash(self.group)
        if actual != self.manifest.content_hash:
            raise KDMError(f"{self.url}: content hash mismatch (manifest {self.manifest.content_hash[:16]}, "
                           f"data {actual[:16]}): the store is corrupt or was modified")


def read_store_manifest(url: str) -> PairStoreManifest:
    return PairStore.open(url).manifest
