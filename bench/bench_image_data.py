"""Throughput of the chunk-shuffled pair sampler (pipeline.training.image_data) on a CIFAR-shaped local store.

    python bench/bench_image_data.py                        # builds /tmp/kdm-bench-pairs (50k pairs, chunk 1000)
    python bench/bench_image_data.py --store PATH --epochs 2 --buffer-chunks 8 --read-threads 16

Builds the store once (reused when it exists with the same size), then iterates epochs of batches in one
process and prints pairs/s (the target is >= 100k pairs/s). Batches stay on the CPU (``--pin`` pins them,
which needs a CUDA build and a GPU).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.errors import ArtifactMissing
from pipeline.training.image_data import ChunkShuffleSampler, write_synthetic_store  # noqa: E402
from pipeline.storage.pairstore import PairStore  # noqa: E402


def get_store(path: str, n: int, chunk: int, shape: tuple[int, ...]) -> PairStore:
    try:
        store = PairStore.open(path)
        if len(store) == n and store.manifest.chunk_size == chunk and tuple(store.manifest.sample_shape) == shape:
            return store
    except ArtifactMissing:
        pass
    t = time.perf_counter()
    store = write_synthetic_store(path, n, shape, chunk)
    print(f"built {path}: {n} pairs, chunk {chunk}, in {time.perf_counter() - t:.1f} s", flush=True)
    return store


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="/tmp/kdm-bench-pairs")
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--chunk", type=int, default=1000)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--buffer-chunks", type=int, default=8)
    ap.add_argument("--read-threads", type=int, default=8)
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--pin", action="store_true")
    ap.add_argument("--via-zarr", action="store_true", help="read chunks through Zarr, not the direct local reader")
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args(argv)

    store = get_store(args.store, args.n, args.chunk, (3, args.resolution, args.resolution))
    sampler = ChunkShuffleSampler(store, args.batch, seed=0, buffer_chunks=args.buffer_chunks,
                                  prefetch=args.prefetch, read_threads=args.read_threads, pin_memory=args.pin,
                                  direct_reads=not args.via_zarr)
    pairs, t = 0, time.perf_counter()
    for epoch in range(args.epochs):
        for batch in sampler.iter_epoch(epoch):
            pairs += batch.x_0.shape[0]
    dt = time.perf_counter() - t
    sampler.close()
    res = {"pairs": pairs, "seconds": dt, "pairs_per_s": pairs / dt, "batch": args.batch,
           "buffer_chunks": args.buffer_chunks, "read_threads": args.read_threads, "chunk": args.chunk,
           "n": args.n, "bytes_per_pair": 2 * 4 * 3 * args.resolution ** 2, "via_zarr": args.via_zarr}
    print(f"{'zarr' if args.via_zarr else 'direct'} reads, {args.read_threads} threads, {args.buffer_chunks} chunks/buffer: "
          f"{pairs} pairs in {dt:.2f} s: {res['pairs_per_s']:,.0f} pairs/s "
          f"({res['pairs_per_s'] * res['bytes_per_pair'] / 1e9:.2f} GB/s of float32 x_T + x_0)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
