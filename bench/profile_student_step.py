#!/usr/bin/env python
"""Where a KDM image training step spends its time: data loader alone, trainer step alone, both together,
and the top operators of a profiled step (CPU and CUDA time).

    python bench/profile_student_step.py --out runs/profile.json                  # the CIFAR-10 mini student
    python bench/profile_student_step.py --preset-size --batch 128 --out ...      # the full cifar10-uncond

Data: a synthetic pair store (pipeline.training.image_data.write_synthetic_store) on local disk.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pipeline.devices import resolve_device
from timing import sync, time_steps  # noqa: E402
from pipeline.training.image_data import ChunkShuffleSampler, write_synthetic_store  # noqa: E402
from pipeline.training.image_train import ImageTrainer  # noqa: E402
from storage_schemas.kdm_image import ImageTrainConfig, KDMImageConfig, image_preset  # noqa: E402


def timed(fn, n: int, dev) -> float:
    return time_steps(fn, dev, 0, n)["step_s"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=1)
    ap.add_argument("--preset-size", action="store_true", help="the full cifar10-uncond U-Nets")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--pairs", type=int, default=20_000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dev = resolve_device(a.device)
    base = image_preset("cifar10-uncond").model_dump()
    if not a.preset_size:
        base["unet"].update(model_channels=a.channels, num_blocks=a.blocks)
    base.update(distance="pseudo-huber", adv_weight=0.0)
    mc = KDMImageConfig.model_validate(base)
    tc = ImageTrainConfig(batch_size=a.batch, precision=a.precision, device="cuda" if dev.type == "cuda" else "cpu")
    res: dict = {"gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None, "torch": torch.__version__,
                 "batch": a.batch, "model": "cifar10-uncond" if a.preset_size else f"c{a.channels}b{a.blocks}",
                 "precision": a.precision}
    with tempfile.TemporaryDirectory() as tmp:
        store = write_synthetic_store(str(Path(tmp) / "p"), a.pairs, chunk_size=min(10_000, a.pairs))
        for pin in (False, True):
            sampler = ChunkShuffleSampler(store, a.batch, seed=0, buffer_chunks=tc.buffer_chunks,
                                          pin_memory=pin and dev.type == "cuda", read_threads=tc.read_threads)
            it = iter(sampler)
            next(it)
            res[f"loader_ms_pin_{pin}"] = 1e3 * timed(lambda: next(it), a.steps * 2, torch.device("cpu"))
            it.close()
            sampler.close()
        trainer = ImageTrainer(mc, tc, dev)
        batch = next(iter(ChunkShuffleSampler(store, a.batch, seed=0, pin_memory=dev.type == "cuda")))
        step = lambda: trainer.train_step(batch.x_T, batch.x_0, batch.label)  # noqa: E731
        timed(step, 3, dev)
        res["step_ms_fixed_batch"] = 1e3 * timed(step, a.steps, dev)
        sampler = ChunkShuffleSampler(store, a.batch, seed=1, buffer_chunks=tc.buffer_chunks,
                                      pin_memory=dev.type == "cuda", read_threads=tc.read_threads)
        it = iter(sampler)

        def step_loaded():
            b = next(it)
            trainer.train_step(b.x_T, b.x_0, b.label)
        timed(step_loaded, 3, dev)
        res["step_ms_with_loader"] = 1e3 * timed(step_loaded, a.steps, dev)
        it.close()
        sampler.close()
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(3):
                step()
            sync(dev)
        ev = prof.key_averages()
        res["ops_per_step"] = sum(e.count for e in ev if not e.key.startswith("cuda") and "::" in e.key) / 3
        sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        res["top_ops"] = prof.key_averages().table(sort_by=sort, row_limit=15)
        res["top_ops_cpu"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10)
    for k, v in res.items():
        print(f"{k}: {v:.1f}" if isinstance(v, float) else f"{k}:\n{v}" if k.startswith("top") else f"{k}: {v}")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
