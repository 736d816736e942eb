"""Pair stores: Zarr v3 groups of (x_T, x_0, label, seed) at any fsspec URL, and of trajectory snapshots
(``x_t``, (N, K, *sample_shape)) when the store keeps them.

Layout (see storage_schemas.pairs): arrays at the group root, chunked along N, zstd + crc32c; the
manifest in the group attribute ``kdm``; an optional held-out split in the child group ``heldout``.
Arrays are sized once, up front; writers fill whole chunks (Zarr 3 loses data under concurrent
appends or partial-chunk writes from several processes).

Integrity: Zarr reads a missing chunk as its fill value, so the manifest records, at commit, the sha256 of
every chunk's rows (``chunk_digests``) and every read of a committed store goes through
``PairStore.read_chunk``, which checks the chunk it reads (stores from before digests: that the chunk
exists; Zarr's crc32c catches altered bytes). A bad chunk raises DataCorrupt naming the store, the array
and the chunk; nothing is trained, filtered, evaluated or exported from it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Type, TypeVar

import numpy as np
import zarr
from pydantic import BaseModel
from zarr.codecs import Crc32cCodec, ZstdCodec

from storage_schemas.pairs import HeldoutRef
from storage_schemas import (HELDOUT_GROUP, MANIFEST_KEY, PAIR_ARRAYS, SNAPSHOT_ARRAY, ArraySpec, PairStoreManifest,
                             store_arrays)

from pipeline.storage import artifacts, manifests
from storage_schemas.pairs import PAIR_SCHEMA_VERSION
from pipeline.errors import ArtifactMissing, DataCorrupt, KDMError

CODECS = ("zstd(level=3)", "crc32c")
WRITING_KEY = "kdm_writing"   # group attribute: the version an unfinished writer is producing
M = TypeVar("M", bound=BaseModel)
DTYPES = {"x_T": "float32", "x_0": "float32", "label": "int32", "seed": "int64", "source_index": "int64",
          SNAPSHOT_ARRAY: "float32"}


def _store(url: str, read_only: bool = False):
    if artifacts.is_local(url):
        return zarr.storage.LocalStore(str(artifacts.local_path(url)), read_only=read_only)
    return zarr.storage.FsspecStore.from_url(str(url), read_only=read_only)


def open_group(url: str, mode: str = "r") -> zarr.Group:
    return zarr.open_group(_store(url, read_only=(mode == "r")), mode=mode, zarr_format=3)


def open_manifest_group(url: str, manifest_model: Type[M], what: str, writer: str = "kdm") -> tuple[zarr.Group, M]:
    """A committed kdm Zarr group (read-only) and its manifest (root attribute ``kdm``) as ``manifest_model``.

    The manifest is read and checked first (``manifests.read_group_manifest``: ArtifactMissing / KDMError
    naming the ``what`` and its ``writer``), then the group is opened.
    """
    manifest = manifests.read_group_manifest(url, manifest_model, what, writer)
    try:
        g = open_group(url, "r")
    except FileNotFoundError:
        raise ArtifactMissing(f"no {what} at {url} (expected a Zarr v3 group written by {writer})") from None
    return g, manifest


def create_arrays(url: str, count: int, sample_shape: tuple[int, ...], chunk_size: int,
                  extra: Iterable[str] = (), snapshots: int = 0) -> zarr.Group:
    """Create the group and its arrays, fully sized, at ``url`` (overwriting what is there); ``snapshots`` = K > 0
    adds ``x_t`` (count, K, *sample_shape)."""
    g = zarr.open_group(_store(url), mode="w", zarr_format=3)
    names = list(store_arrays(snapshots > 0)) + list(extra)
    for name in names:
        shape = ((count, *sample_shape) if name in ("x_T", "x_0") else
                 (count, snapshots, *sample_shape) if name == SNAPSHOT_ARRAY else (count,))
        chunks = (max(1, min(chunk_size, count)), *shape[1:])
        g.create_array(name, shape=shape, chunks=chunks, dtype=DTYPES[name], fill_value=0,
                       compressors=[ZstdCodec(level=3), Crc32cCodec()])
    g.attrs["kdm_status"] = "writing"
    return g


def _remote(group: zarr.Group) -> bool:
    return not isinstance(group.store, zarr.storage.LocalStore)


def write_region(group: zarr.Group, start: int, data: dict[str, np.ndarray]) -> None:
    """Write rows ``start:start + n`` of every array in ``data`` (on an object store, the arrays at once)."""
    n = None
    arrays = {}
    for name, arr in data.items():
        arr = np.ascontiguousarray(arr, dtype=DTYPES[name])
        if n is None:
            n = arr.shape[0]
        elif arr.shape[0] != n:
            raise ValueError(f"region arrays disagree in length: {name} has {arr.shape[0]}, expected {n}")
        arrays[name] = arr

    def put(item) -> None:
        name, arr = item
        group[name][start:start + n] = arr

    artifacts.io_map(put, arrays.items(), _remote(group))


UNREADABLE = "unreadable"


def _read_error(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "checksum" in text.lower():
        return "its crc32c checksum does not match: the file was altered or truncated"
    return artifacts.short(text, 120)


def chunk_digest(rows: np.ndarray) -> str:
    """sha256 of rows as raw little-endian bytes (one chunk's rows: the manifest's ``chunk_digests``)."""
    return hashlib.sha256(_le(rows)).hexdigest()


def _le(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows)
    return np.ascontiguousarray(rows.astype(rows.dtype.newbyteorder("<"), copy=False))


def _ordered_names(group: zarr.Group, names: Optional[Iterable[str]]) -> list[str]:
    if names is None:
        present = set(group.array_keys())
        names = [n for n in PAIR_ARRAYS if n in present] + sorted(present - set(PAIR_ARRAYS))
    return list(names)


def scan(group: zarr.Group, names: Optional[Iterable[str]] = None,
         tolerant: bool = False) -> tuple[str, dict[str, list[str]]]:
    """One pass over every chunk: (content hash, per-array chunk digests).

    The content hash is sha256 over (name, dtype, shape, raw little-endian bytes) of each array,
    PAIR_ARRAYS first; the digest of a chunk is the sha256 of its rows' bytes (``chunk_digest``). A chunk
    that cannot be read raises DataCorrupt, or with ``tolerant`` gets the digest ``UNREADABLE`` (the
    content hash is then meaningless).
    """
    h = hashlib.sha256()
    digests: dict[str, list[str]] = {}
    for name in _ordered_names(group, names):
        a = group[name]
        h.update(f"{name}|{a.dtype}|{a.shape}|".encode())
        rows = max(1, int(a.chunks[0])) if a.chunks else 1
        out = digests[name] = []

        def read(s: int, a=a, rows=rows):
            try:
                return _le(a[s:s + rows]), None
            except Exception as e:   # crc32c mismatch, truncated chunk, a failed request
                return None, e

        starts = list(range(0, a.shape[0], rows))
        window = 2 * artifacts.IO_WORKERS if _remote(group) else 1     # chunks read at once, in order
        results = (r for w in range(0, len(starts), window)
                   for r in zip(starts[w:w + window], artifacts.io_map(read, starts[w:w + window], _remote(group))))
        for s, (b, e) in results:
            if e is not None:
                where = f"{group.store_path}: array '{name}', chunk {s // rows}"
                transport = artifacts.transport_error(where, e) if _remote(group) else None
                if transport is not None:
                    raise transport from None
                if not tolerant:
                    raise DataCorrupt(f"{group.store_path}: array '{name}', chunk {s // rows} cannot be read "
                                      f"({_read_error(e)})") from None
                out.append(UNREADABLE)
                continue
            h.update(b)
            out.append(hashlib.sha256(b).hexdigest())
    return h.hexdigest(), digests


def content_hash(group: zarr.Group, names: Optional[Iterable[str]] = None) -> str:
    """sha256 over (name, dtype, shape, raw little-endian bytes) of each array, PAIR_ARRAYS first."""
    return scan(group, names)[0]


def chunk_key(arr, c: int) -> str:
    """The store key of chunk ``c`` (along N) of ``arr``, relative to the array, e.g. ``c/3/0``."""
    return arr.metadata.encode_chunk_key((c,) + (0,) * (len(arr.shape) - 1))


def chunk_present(arr, c: int) -> bool:
    from zarr.core.sync import sync
    return bool(sync((arr.store_path / chunk_key(arr, c)).exists()))


def array_specs(group: zarr.Group) -> dict[str, ArraySpec]:
    return {name: ArraySpec(shape=tuple(a.shape), dtype=str(a.dtype), chunks=tuple(a.chunks), codecs=CODECS)
            for name, a in sorted(group.arrays())}


def finalize(group: zarr.Group, scanned: Optional[tuple[str, dict[str, list[str]]]] = None,
             **manifest_fields) -> PairStoreManifest:
    """Compute the content hash and chunk digests (or take ``scanned``, the result of ``scan(group)``),
    validate and write the manifest (the last write of a store). A train split's manifest records the
    held-out child committed beside it (finalize the child first)."""
    fields = dict(manifest_fields)
    fields["content_hash"], fields["chunk_digests"] = scanned if scanned is not None else scan(group)
    if fields.get("split") == "train" and HELDOUT_GROUP in group:
        held = group[HELDOUT_GROUP].attrs.get(MANIFEST_KEY)
        if held is None:
            raise KDMError("finalize the held-out split before the train split")
        fields["heldout"] = HeldoutRef(version=held["version"], count=held["count"],
                                       content_hash=held["content_hash"])
    fields["arrays"] = array_specs(group)
    fields["count"] = group["x_0"].shape[0]
    fields["sample_shape"] = tuple(group["x_0"].shape[1:])
    if fields.get("snapshots") is not None:
        fields["schema_version"] = PAIR_SCHEMA_VERSION
    manifest = PairStoreManifest(**fields)
    attrs = dict(group.attrs)
    attrs.pop("kdm_status", None)
    attrs.pop(WRITING_KEY, None)
    attrs[MANIFEST_KEY] = manifest.model_dump(mode="json")
    snap = manifest.snapshots
    attrs["description"] = (f"kdm pair store ({manifest.split}, {manifest.count} pairs): arrays x_T, x_0 "
                            f"(float32, (N, *sample_shape)), label (int32, -1 = unconditional), seed (int64)"
                            + (f", {SNAPSHOT_ARRAY} (float32, (N, {snap.count}, *sample_shape): {snap.count} "
                               f"intermediate trajectory states at {snap.axis} levels "
                               f"{', '.join(f'{v:.4g}' for v in snap.levels)})" if snap else "")
                            + f"; manifest under attribute '{MANIFEST_KEY}'")
    group.attrs.clear()
    group.attrs.update(attrs)
    return manifest


DAMAGED_HINT = "the pair store is damaged: regenerate or re-import it, or restore it from a copy"


@dataclass
class PairStore:
    """A committed pair store (or its held-out child group).

    Every read of array data goes through ``read_chunk`` (or ``read`` / ``load`` / ``iter_chunks``, built on
    it): each chunk is checked as it is read against the digest the manifest recorded at commit time
    (stores written before digests existed: the chunk must be present), so a missing, truncated or
    altered chunk raises DataCorrupt naming the store, the array and the chunk instead of being read as
    zeros. ``group`` is the raw Zarr group, for metadata only.
    """

    url: str
    group: zarr.Group
    manifest: PairStoreManifest

    @classmethod
    def open(cls, url: str) -> "PairStore":
        g, manifest = open_manifest_group(url, PairStoreManifest, "pair store")
        store = cls(str(url), g, manifest)
        store._check_arrays()
        return store

    def _check_arrays(self) -> None:
        """Each array of the manifest exists with the recorded shape, dtype and chunks (metadata only)."""
        for name, spec in self.manifest.arrays.items():
            try:
                a = self.group[name]
            except (KeyError, FileNotFoundError):
                raise DataCorrupt(f"{self.url}: array '{name}' is missing (its {name}/zarr.json is gone); "
                                  f"{DAMAGED_HINT}") from None
            got = (tuple(a.shape), str(a.dtype), tuple(a.chunks))
            want = (tuple(spec.shape), spec.dtype, tuple(spec.chunks))
            if got != want:
                raise DataCorrupt(f"{self.url}: array '{name}' has shape/dtype/chunks {got}, the manifest records "
                                  f"{want}; {DAMAGED_HINT}")

    @property
    def version(self) -> str:
        return self.manifest.version

    def __len__(self) -> int:
        return self.manifest.count

    def heldout(self) -> Optional["PairStore"]:
        """The held-out split, or None. A train split committed with one (``manifest.heldout``) must
        still hold that very split."""
        ref = self.manifest.heldout
        if HELDOUT_GROUP not in self.group:
            if ref is not None:
                raise DataCorrupt(f"{self.url}: the held-out split '{HELDOUT_GROUP}' (version {ref.version}, "
                                  f"{ref.count} pairs) is missing; {DAMAGED_HINT}")
            return None
        held = PairStore.open(artifacts.join(self.url, HELDOUT_GROUP))
        if ref is not None and (ref.version, ref.count, ref.content_hash) != (
                held.version, len(held), held.manifest.content_hash):
            raise DataCorrupt(f"{self.url}: the held-out split holds version {held.version} ({len(held)} pairs), "
                              f"not the {ref.version} ({ref.count} pairs) it was committed with; {DAMAGED_HINT}")
        return held

    # -- the read path ---------------------------------------------------------------------------------
    def array(self, name: str):
        """The Zarr array ``name`` (metadata: shape, dtype, chunks); read its data with ``read_chunk``."""
        if name not in self.manifest.arrays:
            raise KDMError(f"{self.url} has no array '{name}' (arrays: {', '.join(self.manifest.arrays)})")
        return self.group[name]

    def chunk_rows(self, name: str) -> int:
        """Rows per chunk of array ``name``."""
        return max(1, int(self.manifest.arrays[name].chunks[0]))

    def num_chunks(self, name: str) -> int:
        return -(-self.manifest.arrays[name].shape[0] // self.chunk_rows(name))

    def _where(self, name: str, c: int) -> str:
        a = self.array(name)
        rows = self.chunk_rows(name)
        lo, hi = c * rows, min((c + 1) * rows, a.shape[0])
        return f"{self.url}: array '{name}', chunk {c} (rows {lo}-{hi - 1}, file {name}/{chunk_key(a, c)})"

    def check_chunk(self, name: str, c: int, rows: np.ndarray, present: Optional[bool] = None) -> None:
        """Raise DataCorrupt unless ``rows`` (chunk ``c`` of ``name`` as read) match the manifest's digest;
        stores without digests: unless the chunk is present (``present``: already known by the caller)."""
        digests = self.manifest.chunk_digests
        if digests is not None:
            if chunk_digest(rows) == digests[name][c]:
                return
            if present is None:
                present = chunk_present(self.array(name), c)
            problem = "is missing" if not present else "does not match the checksum recorded in the manifest"
            raise DataCorrupt(f"{self._where(name, c)} {problem}; {DAMAGED_HINT}")
        if present is None:
            present = chunk_present(self.array(name), c)
        if not present:
            raise DataCorrupt(f"{self._where(name, c)} is missing; {DAMAGED_HINT}")

    def read_chunk(self, name: str, c: int) -> np.ndarray:
        """The rows of chunk ``c`` of array ``name``, checked (the single read path of a pair store)."""
        if not 0 <= c < self.num_chunks(name):
            raise IndexError(f"chunk {c} of {name} is out of range [0, {self.num_chunks(name)})")
        a = self.array(name)
        rows = self.chunk_rows(name)
        try:
            data = a[c * rows:(c + 1) * rows]
        except Exception as e:   # zarr's crc32c check, a truncated or undecodable chunk, a failed read
            transport = None if artifacts.is_local(self.url) else artifacts.transport_error(self._where(name, c), e)
            if transport is not None:     # the store was not reached: not damage
                raise transport from None
            raise DataCorrupt(f"{self._where(name, c)} cannot be read ({_read_error(e)}); {DAMAGED_HINT}") from None
        self.check_chunk(name, c, data)
        return data

    def read(self, name: str, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        """Rows [start, stop) of array ``name`` (whole chunks are read and checked)."""
        n = self.manifest.arrays[name].shape[0]
        stop = n if stop is None else min(stop, n)
        start = max(0, start)
        a = self.array(name)
        if stop <= start:
            return np.zeros((0, *a.shape[1:]), a.dtype)
        rows = self.chunk_rows(name)
        parts = artifacts.io_map(lambda c: self.read_chunk(name, c), range(start // rows, (stop - 1) // rows + 1),
                                 not artifacts.is_local(self.url))
        first = (start // rows) * rows
        return np.concatenate(parts)[start - first:stop - first]

    def load(self, names: Iterable[str] = PAIR_ARRAYS) -> dict[str, np.ndarray]:
        return {n: self.read(n) for n in names}

    @property
    def pair_arrays(self) -> tuple[str, ...]:
        """The arrays of its pairs: PAIR_ARRAYS, and ``x_t`` when it keeps trajectory snapshots."""
        return store_arrays(self.manifest.snapshots is not None)

    @property
    def checked(self) -> "CheckedArrays":
        """A drop-in for ``group`` in code that slices arrays (``checked["x_0"][a:b]``, ``.shape``): every
        slice is read through ``read`` (whole chunks, each checked)."""
        return CheckedArrays(self)

    def load_all(self) -> dict[str, np.ndarray]:
        """Every array in memory, each chunk checked, and the content hash checked over them (for readers
        that load a whole store anyway, e.g. the 2-D trainer: the check costs one sha256 pass in memory)."""
        data = self.load(self._hash_order())
        h = hashlib.sha256()
        for name, arr in data.items():
            a = self.array(name)
            h.update(f"{name}|{a.dtype}|{a.shape}|".encode())
            h.update(_le(arr))
        if h.hexdigest() != self.manifest.content_hash:
            raise DataCorrupt(f"{self.url}: content hash mismatch (manifest {self.manifest.content_hash[:16]}, "
                              f"data {h.hexdigest()[:16]}): the manifest was edited or the store is damaged; "
                              f"{DAMAGED_HINT}")
        return data

    def _hash_order(self) -> list[str]:
        present = set(self.manifest.arrays)
        return [n for n in PAIR_ARRAYS if n in present] + sorted(present - set(PAIR_ARRAYS))

    def iter_chunks(self, names: Iterable[str] = PAIR_ARRAYS) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        names = list(names)
        c = self.manifest.chunk_size
        for s in range(0, len(self), c):
            yield s, {n: self.read(n, s, s + c) for n in names}

    def verify(self, heldout: bool = True) -> int:
        """Check every chunk of every array (then the content hash), and the held-out split's
        (``heldout``); returns the number of chunks checked. Raises DataCorrupt naming the first bad chunk."""
        h = hashlib.sha256()
        checked = 0
        for name in self._hash_order():
            a = self.array(name)
            h.update(f"{name}|{a.dtype}|{a.shape}|".encode())
            for c in range(self.num_chunks(name)):
                h.update(_le(self.read_chunk(name, c)))
                checked += 1
        actual = h.hexdigest()
        if actual != self.manifest.content_hash:
            raise DataCorrupt(f"{self.url}: content hash mismatch (manifest {self.manifest.content_hash[:16]}, "
                              f"data {actual[:16]}): the store is corrupt or was modified")
        if heldout:
            held = self.heldout()
            if held is not None:
                checked += held.verify()
        return checked


class CheckedArrays:
    """``store.checked[name]``: an array-like whose slices along N are checked reads (PairStore.read)."""

    def __init__(self, store: PairStore):
        self._store = store

    def __getitem__(self, name: str) -> "_CheckedArray":
        return _CheckedArray(self._store, name)

    def __contains__(self, name: str) -> bool:
        return name in self._store.manifest.arrays


class _CheckedArray:
    def __init__(self, store: PairStore, name: str):
        self._store, self.name = store, name
        a = store.array(name)
        self.shape, self.dtype, self.chunks = tuple(a.shape), a.dtype, tuple(a.chunks)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        rest = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        if isinstance(key, (int, np.integer)):
            i = int(key) + (self.shape[0] if key < 0 else 0)
            return self._store.read(self.name, i, i + 1)[(0, *rest)]
        if isinstance(key, slice) and key.step in (None, 1):
            start, stop, _ = key.indices(self.shape[0])
            out = self._store.read(self.name, start, stop)
        else:
            out = self._store.read(self.name)[key]
        return out[(slice(None), *rest)] if rest else out


def read_store_manifest(url: str) -> PairStoreManifest:
    return PairStore.open(url).manifest
