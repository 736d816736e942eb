"""Chunk-shuffled pair batches: coverage, determinism, resumable cursor, DDP sharding."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import KDMError
from pipeline.training.image_data import ChunkShuffleSampler, Cursor, write_synthetic_store

N, CHUNK = 230, 20          # 12 chunks, the last one short


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_synthetic_store(str(tmp_path_factory.mktemp("d") / "pairs"), N, (1, 2, 2), CHUNK, seed=3,
                                 num_classes=5)


def ids(batch) -> np.ndarray:
    """Recover store indices from x_0 values (unique per pair)."""
    return batch.x_0.reshape(batch.x_0.shape[0], -1)[:, 0].numpy()


@pytest.fixture(scope="module")
def index_of(store):
    first = store.group["x_0"][:].reshape(N, -1)[:, 0]
    assert len(np.unique(first)) == N
    lookup = {float(v): i for i, v in enumerate(first)}
    return lambda batch: np.array([lookup[float(v)] for v in ids(batch)])


def test_every_pair_exactly_once_per_epoch(store, index_of):
    s = ChunkShuffleSampler(store, batch_size=23, seed=1, buffer_chunks=3, drop_last=False)
    seen = np.concatenate([index_of(b) for b in s.iter_epoch(0)])
    assert sorted(seen) == list(range(N))
    assert not np.array_equal(seen, np.arange(N))                      # shuffled
    assert np.array_equal(seen, s.epoch_order(0))
    # batches carry consistent x_T / label rows
    b = next(iter(s.iter_epoch(0)))
    idx = index_of(b)
    assert torch.equal(b.x_T, torch.from_numpy(store.group["x_T"][:][idx]))
    assert torch.equal(b.label, torch.from_numpy(store.group["label"][:][idx]).long())
    assert b.x_T.dtype == torch.float32 and b.label.dtype == torch.int64
    # drop_last: full batches only, each pair at most once
    s2 = ChunkShuffleSampler(store, batch_size=23, seed=1, buffer_chunks=3)
    batches = list(s2.iter_epoch(0))
    assert len(batches) == N // 23 == s2.batches_per_epoch and all(len(b.x_0) == 23 for b in batches)
    seen2 = np.concatenate([index_of(b) for b in batches])
    assert len(set(seen2)) == len(seen2) == 230


def test_deterministic_per_seed_and_epoch(store, index_of):
    def order(seed, epoch, **kw):
        s = ChunkShuffleSampler(store, batch_size=10, seed=seed, buffer_chunks=2, **kw)
        return np.concatenate([index_of(b) for b in s.iter_epoch(epoch)])

    a = order(0, 0)
    assert np.array_equal(a, order(0, 0, prefetch=0, read_threads=1))   # timing / threads do not matter
    assert np.array_equal(a, order(0, 0, direct_reads=False))            # direct chunk reads == Zarr reads
    assert not np.array_equal(a, order(1, 0))
    assert not np.array_equal(a, order(0, 1))


def test_resume_from_cursor_mid_epoch(store, index_of):
    B = 16
    full = ChunkShuffleSampler(store, batch_size=B, seed=7, buffer_chunks=2)
    it = iter(full)
    stream = [index_of(next(it)) for _ in range(25)]           # crosses into epoch 1 (14 batches/epoch)
    assert full.cursor == Cursor(1, 11 * B)

    part = ChunkShuffleSampler(store, batch_size=B, seed=7, buffer_chunks=2)
    it = iter(part)
    for _ in range(5):
        next(it)
    state = part.state_dict()
    assert state["cursor"] == {"epoch": 0, "offset": 5 * B}
    it.close()

    resumed = ChunkShuffleSampler(store, batch_size=B, seed=7, buffer_chunks=2)
    resumed.load_state_dict(state)
    rest = [index_of(b) for b, _ in zip(resumed, range(20))]
    for a, b in zip(stream[5:], rest):
        assert np.array_equal(a, b)
    # the cursor moves to the next epoch after its last batch
    at_end = ChunkShuffleSampler(store, batch_size=B, seed=7, buffer_chunks=2, cursor=Cursor(0, 13 * B))
    it = iter(at_end)
    next(it)
    assert at_end.cursor == Cursor(1, 0)


def test_ddp_sharding_splits_batches_disjointly(store, index_of):
    B, W = 10, 3
    single = ChunkShuffleSampler(store, batch_size=B, seed=5, buffer_chunks=2)
    ref = [index_of(b) for b in single.iter_epoch(0)]
    shards = [[index_of(b) for b in ChunkShuffleSampler(store, batch_size=B, seed=5, buffer_chunks=2, rank=r,
                                                        world_size=W).iter_epoch(0)] for r in range(W)]
    per_rank = N // (B * W)
    assert all(len(s) == per_rank for s in shards)
    for r in range(W):
        for k in range(per_rank):
            assert np.array_equal(shards[r][k], ref[k * W + r])          # rank r takes every W-th batch
    flat = np.concatenate([np.concatenate(s) for s in shards])
    assert len(set(flat)) == len(flat) == per_rank * W * B
    # a mid-epoch cursor is shared by all ranks
    resumed = [ChunkShuffleSampler(store, batch_size=B, seed=5, buffer_chunks=2, rank=r, world_size=W,
                                   cursor=Cursor(0, 2 * B * W)) for r in range(W)]
    for r in range(W):
        first = index_of(next(iter(resumed[r])))
        assert np.array_equal(first, ref[2 * W + r])


def test_cursor_validation(store):
    with pytest.raises(KDMError, match="multiple of"):
        ChunkShuffleSampler(store, batch_size=10, cursor=Cursor(0, 15))
    with pytest.raises(ValueError, match="drop_last"):
        ChunkShuffleSampler(store, batch_size=10, world_size=2, drop_last=False)
    s = ChunkShuffleSampler(store, batch_size=10, seed=0)
    with pytest.raises(KDMError, match="seed"):
        s.load_state_dict({"cursor": {"epoch": 0, "offset": 0}, "seed": 1})


def test_close_while_a_buffer_read_is_in_flight(store, monkeypatch):
    """close() must not deadlock with a prefetch that still has to start its chunk readers."""
    import threading
    import time

    s = ChunkShuffleSampler(store, batch_size=10, seed=0, buffer_chunks=1, prefetch=2)
    real = ChunkShuffleSampler._read_buffer

    def slow_read(self, epoch, b):
        time.sleep(0.2)                       # close() is called during this sleep
        return real(self, epoch, b)

    monkeypatch.setattr(ChunkShuffleSampler, "_read_buffer", slow_read)
    it = iter(s)
    next(it)
    done = threading.Event()
    t = threading.Thread(target=lambda: (it.close(), s.close(), done.set()), daemon=True)
    t.start()
    assert done.wait(10), "close() deadlocked"
