"""Chunk-aware shuffled batches from a pair store, resumable and shardable.

Random per-item reads of a Zarr store are slow (a chunk is decompressed whole), so an epoch is planned
in whole chunks:

1. the chunk order is a permutation drawn from (seed, epoch);
2. the permuted chunks are grouped into buffers of ``buffer_chunks`` chunks; a buffer is read with one
   contiguous slice read per chunk (in parallel threads) and its rows are shuffled by a permutation
   drawn from (seed, epoch, buffer);
3. the epoch's sample order is the concatenation of the shuffled buffers, cut into batches of
   ``batch_size``. A batch that straddles two buffers takes the tail of one and the head of the next.

Everything depends only on (seed, epoch), never on timing or the number of reader threads, so the
order is reproducible. ``Cursor(epoch, offset)`` says how many samples of the epoch's order have been
consumed; it goes into checkpoints, and a sampler built with the same store, seed, batch size and
buffer size and started from it yields exactly the batches an uninterrupted run would have yielded next.

Sharding (DDP): global batch i goes to rank i % world_size, so one optimizer step (one "round")
consumes world_size * batch_size samples and the cursor is the same on every rank. With
``drop_last`` (the default, required for several ranks) every rank gets the same number of full
batches per epoch and the fewer than world_size * batch_size left-over samples of the epoch's order
are skipped (different ones each epoch). Every rank reads the buffers that its batches touch.

A background thread reads ahead ``prefetch`` buffers. Chunks of local stores are read and decoded
directly (file, crc32c, zstd) in ``read_threads`` threads; other stores go through Zarr. Batches are CPU tensors (x_T, x_0 float32,
label int64; -1 = unconditional), in pinned memory when ``pin_memory`` is set so that
``.to(device, non_blocking=True)`` overlaps the copy with compute.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import numpy as np
import torch

from storage_schemas import SamplerSettings, SeedRange, TeacherRef, code_version, stable_hash, utc_now

from pipeline.storage import pairstore
from pipeline.errors import DataCorrupt, KDMError
from pipeline.storage.pairstore import DAMAGED_HINT, PairStore

ARRAYS = ("x_T", "x_0", "label")


class PairBatch(NamedTuple):
    x_T: torch.Tensor
    x_0: torch.Tensor
    label: torch.Tensor
    x_t: Optional[torch.Tensor] = None      # (B, K, *sample_shape) trajectory snapshots, when asked for


@dataclass(frozen=True)
class Cursor:
    """Position in the sample stream: ``offset`` samples of epoch ``epoch``'s order are consumed."""

    epoch: int = 0
    offset: int = 0

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    @classmethod
    def from_dict(cls, d: dict) -> "Cursor":
        return cls(int(d["epoch"]), int(d["offset"]))


class _LocalChunkReader:
    """Whole chunks of a local Zarr v3 array written by kdm (bytes | zstd | crc32c), decoded in the calling
    thread: file read, crc32c check, zstd decompression, no trip through Zarr's event loop. Several
    threads then decode in parallel. ``make`` returns None for any other store or codec chain, and the
    sampler reads through Zarr instead."""

    def __init__(self, arr, root: Path):
        from numcodecs import Zstd
        self.arr, self.root = arr, root
        self.zstd = Zstd()
        self.chunk_shape = tuple(arr.chunks)
        self.dtype = np.dtype(arr.dtype).newbyteorder("<")

    @classmethod
    def make(cls, arr) -> Optional["_LocalChunkReader"]:
        try:
            from zarr.storage import LocalStore
            store = arr.store_path.store
            names = [type(c).__name__ for c in arr.metadata.codecs]
            endian = getattr(getattr(arr.metadata.codecs[0], "endian", None), "value", None)
            if not isinstance(store, LocalStore) or names != ["BytesCodec", "ZstdCodec", "Crc32cCodec"] \
                    or endian != "little" or arr.metadata.fill_value != 0:
                return None
            import google_crc32c  # noqa: F401
            return cls(arr, Path(store.root) / arr.path)
        except Exception:
            return None

    def read(self, c: int) -> tuple[np.ndarray, bool]:
        """(chunk ``c`` decoded, padded to the chunk shape; whether its file exists). A missing file reads as
        the fill value: the caller checks the rows against the manifest (PairStore.check_chunk)."""
        import google_crc32c
        key = self.arr.metadata.encode_chunk_key((c,) + (0,) * (len(self.chunk_shape) - 1))
        path = self.root / key
        if not path.exists():
            return np.zeros(self.chunk_shape, self.dtype), False
        with open(path, "rb") as f:
            body = f.read(max(os.fstat(f.fileno()).st_size - 4, 0))
            stored = f.read(4)
        if np.uint32(google_crc32c.value(body)).tobytes() != stored:
            raise DataCorrupt(f"{path}: crc32c checksum mismatch (chunk {c} of array '{self.arr.basename}'); "
                              f"{DAMAGED_HINT}")
        out = np.empty(self.chunk_shape, self.dtype)
        try:
            self.zstd.decode(body, out=out)
        except Exception as e:
            raise DataCorrupt(f"{path}: chunk {c} of array '{self.arr.basename}' cannot be decoded ({e}); "
                              f"{DAMAGED_HINT}") from None
        return out, True


class ChunkShuffleSampler:
    """Infinite (``iter``) or per-epoch (``iter_epoch``) shuffled batches of one rank."""

    def __init__(self, store: PairStore | str, batch_size: int, *, seed: int = 0, buffer_chunks: int = 8,
                 rank: int = 0, world_size: int = 1, drop_last: bool = True, pin_memory: bool = False,
                 prefetch: int = 2, read_threads: int = 8, cursor: Optional[Cursor] = None,
                 direct_reads: bool = True, snapshots: bool = False):
        if isinstance(store, str):
            store = PairStore.open(store)
        if batch_size < 1 or buffer_chunks < 1 or prefetch < 0 or read_threads < 1:
            raise ValueError("batch_size, buffer_chunks and read_threads must be >= 1, prefetch >= 0")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if world_size > 1 and not drop_last:
            raise ValueError("drop_last=False would give the ranks different numbers of batches; "
                             "use drop_last=True with several ranks")
        self.store = store
        if snapshots and store.manifest.snapshots is None:
            raise KDMError(f"{store.url} keeps no trajectory snapshots (array x_t)")
        self.names = ARRAYS + (("x_t",) if snapshots else ())
        self.arrays = {n: store.array(n) for n in self.names}
        self._direct = {n: _LocalChunkReader.make(a) if direct_reads else None for n, a in self.arrays.items()}
        self.n = len(store)
        self.chunk_size = int(self.arrays["x_0"].chunks[0])
        self.num_chunks = -(-self.n // self.chunk_size)
        self.batch_size, self.seed, self.buffer_chunks = batch_size, seed, buffer_chunks
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.pin_memory, self.prefetch, self.read_threads = pin_memory, prefetch, read_threads
        self.round_size = batch_size * world_size
        if drop_last and self.n < self.round_size:
            raise KDMError(f"the store holds {self.n} pairs, fewer than one round of batches "
                           f"(batch_size {batch_size} x world_size {world_size}); use a smaller batch")
        self.cursor = cursor or Cursor()
        self._check_cursor(self.cursor)
        self._pool: Optional[ThreadPoolExecutor] = None
        self._readers: Optional[ThreadPoolExecutor] = None
        self._lock = threading.Lock()

    # -- plan ---------------------------------------------------------------------------------------
    @property
    def samples_per_epoch(self) -> int:
        """Samples of the epoch's order that are consumed (all ranks together)."""
        return (self.n // self.round_size) * self.round_size if self.drop_last else self.n

    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank gets per epoch (the same on every rank with drop_last)."""
        if self.drop_last:
            return self.n // self.round_size
        return -(-self.n // self.batch_size)

    def _chunk_len(self, c: int) -> int:
        return min(self.chunk_size, self.n - c * self.chunk_size)

    def _buffers(self, epoch: int) -> list[np.ndarray]:
        perm = np.random.default_rng([self.seed, epoch, 0]).permutation(self.num_chunks)
        return [perm[i:i + self.buffer_chunks] for i in range(0, self.num_chunks, self.buffer_chunks)]

    def _buffer_perm(self, epoch: int, b: int, size: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, 1, b]).permutation(size)

    def _buffer_rows(self, chunks: np.ndarray) -> np.ndarray:
        return np.concatenate([np.arange(c * self.chunk_size, c * self.chunk_size + self._chunk_len(c))
                               for c in chunks])

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The store indices of epoch ``epoch`` in stream order (all ranks; before dropping the tail)."""
        parts = []
        for b, chunks in enumerate(self._buffers(epoch)):
            rows = self._buffer_rows(chunks)
            parts.append(rows[self._buffer_perm(epoch, b, len(rows))])
        return np.concatenate(parts)

    def _bounds(self, epoch: int) -> tuple[list[np.ndarray], np.ndarray]:
        bufs = self._buffers(epoch)
        sizes = [sum(self._chunk_len(int(c)) for c in chunks) for chunks in bufs]
        return bufs, np.concatenate([[0], np.cumsum(sizes)])

    def _batch_starts(self, start: int) -> range:
        """Stream offsets of this rank's batches from round offset ``start`` to the end of the epoch."""
        end = self.samples_per_epoch
        return range(start + self.rank * self.batch_size, end, self.round_size)

    def _needed(self, epoch: int, start: int) -> list[int]:
        """Buffers (in stream order) that this rank's remaining batches of the epoch touch."""
        _, bounds = self._bounds(epoch)
        needed: list[int] = []
        for s in self._batch_starts(start):
            e = min(s + self.batch_size, self.n)
            first = int(np.searchsorted(bounds, s, side="right")) - 1
            last = int(np.searchsorted(bounds, e, side="left")) - 1
            for b in range(first, last + 1):
                if not needed or b > needed[-1]:
                    needed.append(b)
        return needed

    def _check_cursor(self, cur: Cursor) -> None:
        if cur.epoch < 0 or cur.offset < 0 or cur.offset % self.round_size or cur.offset > self.samples_per_epoch:
            raise KDMError(f"data cursor {cur} does not fit this sampler: the offset must be a multiple of "
                           f"batch_size x world_size = {self.round_size} and at most {self.samples_per_epoch}; "
                           f"resume with the batch size of the interrupted run")

    # -- reading ------------------------------------------------------------------------------------
    def _read_buffer(self, epoch: int, b: int) -> dict[str, torch.Tensor]:
        """Read buffer ``b`` of ``epoch`` and return its rows shuffled, as (pinned) CPU tensors."""
        bufs, bounds = self._bounds(epoch)
        chunks = bufs[b]
        size = int(bounds[b + 1] - bounds[b])
        perm = self._buffer_perm(epoch, b, size)
        inv = torch.from_numpy(np.argsort(perm))        # row j of the concatenation goes to inv[j]
        out = {}
        for name, arr in self.arrays.items():
            dtype = torch.int64 if name == "label" else torch.float32
            out[name] = torch.empty((size, *arr.shape[1:]), dtype=dtype, pin_memory=self.pin_memory)
        offsets = np.concatenate([[0], np.cumsum([self._chunk_len(int(c)) for c in chunks])])

        def fill(job: tuple[int, str]) -> None:
            i, name = job
            c = int(chunks[i])
            n = self._chunk_len(c)
            direct = self._direct[name]
            if direct is not None:
                arr, present = direct.read(c)
                arr = arr[:n]
                self.store.check_chunk(name, c, arr, present=present)
            else:
                arr = self.store.read_chunk(name, c)
            data = torch.from_numpy(arr)
            out[name].index_copy_(0, inv[offsets[i]:offsets[i + 1]], data.to(out[name].dtype))

        jobs = [(i, name) for i in range(len(chunks)) for name in self.arrays]
        list(self._reader_pool().map(fill, jobs))
        return out

    def _reader_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._readers is None:
                self._readers = ThreadPoolExecutor(self.read_threads, thread_name_prefix="kdm-read")
            return self._readers

    def _prefetch_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="kdm-prefetch")
            return self._pool

    def close(self) -> None:
        """Stop the reader threads. A buffer read in flight finishes first (it may still need the readers),
        so the lock is never held while waiting for it."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            readers, self._readers = self._readers, None
        if readers is not None:
            readers.shutdown(wait=True, cancel_futures=True)

    def __del__(self):
        try:
            self.close()
        except Exception as e:    # at interpreter exit the pools may already be gone; nothing is lost
            logging.getLogger("kdm.image_data").debug("closing the pair loader: %s", e)

    # -- iteration ----------------------------------------------------------------------------------
    def _buffer_stream(self, cur: Cursor) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
        """(epoch, buffer, data) in the order the batches need them, ``prefetch`` buffers read ahead."""
        def tasks():
            epoch, start = cur.epoch, cur.offset
            while True:
                for b in self._needed(epoch, start):
                    yield epoch, b
                epoch, start = epoch + 1, 0

        it = tasks()
        if self.prefetch == 0:
            for epoch, b in it:
                yield epoch, b, self._read_buffer(epoch, b)
            return
        pending: deque[tuple[int, int, Future]] = deque()
        pool = self._prefetch_pool()
        try:
            while True:
                while len(pending) <= self.prefetch:
                    epoch, b = next(it)
                    pending.append((epoch, b, pool.submit(self._read_buffer, epoch, b)))
                epoch, b, fut = pending.popleft()
                yield epoch, b, fut.result()
        finally:
            for *_, fut in pending:
                fut.cancel()

    def _epoch_batches(self, epoch: int, start: int, buffers: Iterator) -> Iterator[tuple[PairBatch, Cursor]]:
        _, bounds = self._bounds(epoch)
        pieces: list[tuple[int, int, dict[str, torch.Tensor]]] = []   # (lo, hi, data) in stream order
        starts = self._batch_starts(start)
        for k, s in enumerate(starts):
            e = min(s + self.batch_size, self.n)
            while not pieces or pieces[-1][1] < e:
                ep, b, data = next(buffers)
                assert ep == epoch, (ep, epoch)
                pieces.append((int(bounds[b]), int(bounds[b + 1]), data))
            pieces = [p for p in pieces if p[1] > s]
            parts = [(max(s, lo) - lo, min(e, hi) - lo, data) for lo, hi, data in pieces if lo < e]
            if len(parts) == 1:
                a, z, data = parts[0]
                batch = PairBatch(*(data[n][a:z] for n in self.names))
            else:
                batch = PairBatch(*(self._cat([d[n][a:z] for a, z, d in parts]) for n in self.names))
            last = k == len(starts) - 1
            nxt = Cursor(epoch + 1, 0) if last else Cursor(epoch, s - self.rank * self.batch_size + self.round_size)
            yield batch, nxt

    def _cat(self, ts: list[torch.Tensor]) -> torch.Tensor:
        n = sum(t.shape[0] for t in ts)
        out = torch.empty((n, *ts[0].shape[1:]), dtype=ts[0].dtype, pin_memory=self.pin_memory)
        return torch.cat(ts, out=out)

    def __iter__(self) -> Iterator[PairBatch]:
        """Batches from ``self.cursor`` on, forever; ``self.cursor`` is the position after the last batch yielded."""
        cur = self.cursor
        self._check_cursor(cur)
        buffers = self._buffer_stream(cur)
        epoch, start = cur.epoch, cur.offset
        try:
            while True:
                for batch, nxt in self._epoch_batches(epoch, start, buffers):
                    self.cursor = nxt
                    yield batch
                epoch, start = epoch + 1, 0
        finally:
            buffers.close()

    def iter_epoch(self, epoch: int, offset: int = 0) -> Iterator[PairBatch]:
        """This rank's batches of one epoch from ``offset`` (a cursor offset); does not move ``self.cursor``."""
        cur = Cursor(epoch, offset)
        self._check_cursor(cur)
        buffers = self._buffer_stream(cur)
        try:
            for batch, _ in self._epoch_batches(epoch, offset, buffers):
                yield batch
        finally:
            buffers.close()

    def state_dict(self) -> dict:
        return {"cursor": self.cursor.to_dict(), "seed": self.seed, "batch_size": self.batch_size,
                "buffer_chunks": self.buffer_chunks, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "buffer_chunks"):
            if key in state and state[key] != getattr(self, key):
                raise KDMError(f"data state was saved with {key}={state[key]}, this sampler has "
                               f"{getattr(self, key)}: the sample order would change")
        cur = Cursor.from_dict(state["cursor"])
        self._check_cursor(cur)
        self.cursor = cur


def write_synthetic_store(url: str, count: int, sample_shape: tuple[int, ...] = (3, 32, 32), chunk_size: int = 1000,
                          seed: int = 0, num_classes: int = 0, x_T_scale: float = 80.0,
                          snapshots: int = 0) -> PairStore:
    """A committed pair store of random pairs with image shapes, for benchmarks and tests.

    x_T = x_T_scale * eps (eps ~ N(0, I)), x_0 uniform in [-1, 1], labels uniform in [0, num_classes) or -1;
    ``snapshots`` = K > 0 adds K trajectory states, the straight line between them (x_t at the EDM levels of
    K evenly spread steps of 18). The manifest records a teacher of kind 'synthetic-random' (no teacher was run).
    """
    from storage_schemas import Snapshots
    group = pairstore.create_arrays(url, count, tuple(sample_shape), chunk_size, snapshots=snapshots)
    rng = np.random.default_rng(seed)
    spec, steps = None, ()
    if snapshots:
        steps = SamplerSettings.even_snapshots(18, snapshots)
        sig = [(x_T_scale ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - x_T_scale ** (1 / 7))) ** 7 for i in steps]
        spec = Snapshots(count=snapshots, axis="edm-sigma", x_T_level=x_T_scale, levels=tuple(sig), solver_steps=steps)
    for s in range(0, count, chunk_size):
        n = min(chunk_size, count - s)
        label = rng.integers(0, num_classes, n) if num_classes else np.full(n, -1)
        rows = {"x_T": x_T_scale * rng.standard_normal((n, *sample_shape), dtype=np.float32),
                "x_0": rng.uniform(-1, 1, (n, *sample_shape)).astype(np.float32),
                "label": label, "seed": np.arange(s, s + n)}
        if snapshots:
            w = np.array([k / 18 for k in steps], np.float32).reshape(1, -1, *([1] * len(sample_shape)))
            rows["x_t"] = (1 - w) * rows["x_T"][:, None] + w * rows["x_0"][:, None]
        pairstore.write_region(group, s, rows)
    pairstore.finalize(
        group, version="synthetic-" + stable_hash(count, list(sample_shape), chunk_size, seed, num_classes, x_T_scale,
                                                  *([snapshots] if snapshots else [])),
        split="train", origin="teacher", chunk_size=chunk_size, seeds=SeedRange(start=0, stop=max(count, 1)),
        teacher=TeacherRef(id="synthetic-random", sha256="0" * 64, kind="synthetic-random"),
        sampler=SamplerSettings(kind="edm-heun", method="heun", steps=18, noise_scale=x_T_scale,
                                snapshot_steps=steps or None),
        x_T_scale=x_T_scale, num_classes=num_classes, code_version=code_version(), created=utc_now(), snapshots=spec)
    return PairStore.open(url)
