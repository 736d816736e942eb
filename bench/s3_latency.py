"""Import, generate and train against a loopback S3 (moto) behind a proxy that adds latency to every request.

    python bench/s3_latency.py [--latency 0.05] [--pairs 5000]

Prints the seconds and the number of requests of each stage (run from the repository root; the proxy is
tests/fault_proxy.py). Object stores answer each request in 20-100 ms and reward requests in flight at once.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--latency", type=float, default=0.05)
    p.add_argument("--pairs", type=int, default=5000)
    a = p.parse_args()
    import numpy as np
    from fault_proxy import moto_behind_proxy
    from pipeline import presets
    from pipeline.pairs import generate, importer
    from pipeline.teachers import flow_matching as teacher
    from pipeline.training import train2d
    from storage_schemas import PairsGenerateConfig, PairsImportConfig, SamplerSettings, SeedRange
    with tempfile.TemporaryDirectory() as tmp, moto_behind_proxy("bench") as (_, proxy):
        traj = Path(tmp, "traj.npy")
        np.save(traj, np.random.default_rng(0).normal(size=(3, a.pairs, 2)).astype(np.float32))
        t_local = str(Path(tmp, "teacher"))
        teacher.train_teacher(presets.load("teacher", "smoke"), t_local, progress=False)
        proxy.add("latency", times=None, seconds=a.latency)
        runs = {
            "import": lambda: importer.import_pairs(str(traj), PairsImportConfig(
                holdout_fraction=0.1, split_seed=0, chunk_size=a.pairs // 10), "s3://bench/pairs/imported"),
            "generate": lambda: generate.generate_pairs(t_local, PairsGenerateConfig(
                seeds=SeedRange(start=0, stop=a.pairs), heldout_seeds=SeedRange(start=10**6, stop=10**6 + a.pairs // 10),
                sampler=SamplerSettings(method="euler", steps=2), chunk_size=a.pairs // 10),
                "s3://bench/pairs/generated", progress=False),
            "train": lambda: train2d.train_student("s3://bench/pairs/imported", presets.load("student", "smoke", sets=[
                "train.steps=40", "train.checkpoint_every=10", "train.keep_checkpoints=2", "train.threads=1"]),
                "s3://bench/students/s", progress=False),
        }
        for name, run in runs.items():
            n = len(proxy.requests)
            t = time.perf_counter()
            run()
            reqs = proxy.requests[n:]
            print(f"{name}: {time.perf_counter() - t:.1f} s, {len(reqs)} requests "
                  f"({', '.join(f'{k} {v}' for k, v in sorted(Counter(m for m, _ in reqs).items()))}), "
                  f"latency {a.latency * 1000:.0f} ms", flush=True)


if __name__ == "__main__":
    main()
