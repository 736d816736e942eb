#!/usr/bin/env python
"""CIFAR-10 teacher and pairs on one GPU: prepare the dataset, bootstrap the ``cifar10-mini`` EDM teacher,
generate 50k train + 10k held-out EDM-Heun pairs (18 steps, 35 NFE, x_T = 80 eps).

    python bench/cifar10_teacher_pairs.py --root runs/cifar10 --device cuda

Every stage is content-addressed and resumable: running the same command again skips finished stages
and continues an interrupted teacher run or pair generation. Prints one line per stage with its time
and throughput, then a JSON summary (also written to ``<root>/bench.json``). ``--report DIR`` copies the
summary, the teacher's preview grid and a grid of the first 64 generated x_0 into DIR.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.pairs import generate
from pipeline.data.datasets import prepare_image_dataset  # noqa: E402
from pipeline.storage.pairstore import PairStore  # noqa: E402
from pipeline.evaluation.image_metrics import save_grid  # noqa: E402
from pipeline.teachers.bootstrap import PREVIEW, load_edm_teacher_config, train_edm_teacher  # noqa: E402
from storage_schemas import PairsGenerateConfig, SamplerSettings, SeedRange, stable_hash  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archive", default=None, help="a CIFAR-10 archive (default: cifar10 from $KDM_DATA_DIR, "
                   "downloaded there when absent)")
    p.add_argument("--root", default=str(REPO / "runs" / "cifar10-teacher-pairs"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="cifar10-mini")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="teacher config override")
    p.add_argument("--train-pairs", type=int, default=50_000)
    p.add_argument("--heldout-pairs", type=int, default=10_000)
    p.add_argument("--steps", type=int, default=18, help="Heun noise levels (18 = 35 NFE)")
    p.add_argument("--chunk-size", type=int, default=2500)
    p.add_argument("--batch", type=int, default=2500, help="seeds per sampler call")
    p.add_argument("--stages", default="dataset,teacher,pairs")
    p.add_argument("--report", default=None, help="folder for bench.json, preview.png and pairs.png")
    p.add_argument("-q", "--quiet", action="store_true")
    a = p.parse_args(argv)
    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    stages = a.stages.split(",")
    summary: dict = {"device": torch.cuda.get_device_name() if a.device.startswith("cuda") and torch.cuda.is_available()
                     else "cpu", "torch": torch.__version__}
    ds_url = str(root / "cifar10")

    if "dataset" in stages:
        t0 = time.time()
        from pipeline.data import sources
        m = prepare_image_dataset(sources.resolve("cifar10", a.archive).archive, ds_url, progress=not a.quiet)
        summary["dataset"] = {"version": m.version, "train": m.splits["train"].count,
                              "test": m.splits["test"].count if "test" in m.splits else 0,
                              "classes": m.num_classes, "prepare_s": m.prepare_seconds, "stage_s": time.time() - t0}
        print(f"dataset  {m.version}: {summary['dataset']['train']} + {summary['dataset']['test']} images, "
              f"{m.num_classes} classes, prepared in {m.prepare_seconds:.1f} s", flush=True)

    cfg = load_edm_teacher_config(a.preset, sets=[f"device={a.device}", *a.set])
    teacher_url = str(root / "teachers" / f"{a.preset}-{stable_hash(cfg, length=10)}")
    if "teacher" in stages:
        t0 = time.time()
        logs: list[dict] = []
        tm = train_edm_teacher(ds_url, cfg, teacher_url, progress=not a.quiet, on_log=logs.append)
        dt = time.time() - t0
        rates = [r["images_per_s"] for r in logs[1:]] or [r["images_per_s"] for r in logs]
        summary["teacher"] = {"id": tm.id, "steps": cfg.steps, "batch": cfg.batch_size, "final_loss": tm.final_loss,
                              "stage_s": dt, "images_per_s": float(np.median(rates)) if rates else None,
                              "parameters": None}
        net = sum(t.numel() for t in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
            str(Path(teacher_url) / "weights.safetensors")).values())
        summary["teacher"]["parameters"] = net
        print(f"teacher  {tm.id}: {cfg.steps} steps x {cfg.batch_size} in {dt:.0f} s "
              f"({summary['teacher']['images_per_s'] or 0:.0f} img/s), final loss {tm.final_loss:.4f}", flush=True)

    if "pairs" in stages:
        n, h = a.train_pairs, a.heldout_pairs
        pcfg = PairsGenerateConfig(seeds=SeedRange(start=0, stop=n),
                                   heldout_seeds=SeedRange(start=n, stop=n + h) if h else None,
                                   sampler=SamplerSettings(kind="edm-heun", steps=a.steps), chunk_size=a.chunk_size,
                                   device="cuda" if a.device.startswith("cuda") else "cpu")
        from pipeline.teachers.flow_matching import read_teacher_manifest
        pairs_url = str(root / "pairs" / generate.pairs_version(read_teacher_manifest(teacher_url).id, pcfg))
        t0 = time.time()
        v = generate.generate_pairs(teacher_url, pcfg, pairs_url, progress=not a.quiet, batch_size=a.batch)
        dt = time.time() - t0
        s = PairStore.open(pairs_url)
        x0 = s.read("x_0", 0, 64)
        summary["pairs"] = {"version": v, "url": pairs_url, "train": len(s), "heldout": len(s.heldout() or []),
                            "nfe": pcfg.sampler.nfe, "stage_s": dt, "pairs_per_s": (n + h) / max(dt, 1e-9),
                            "x0_range": [float(x0.min()), float(x0.max())], "content_hash": s.manifest.content_hash}
        print(f"pairs    {v}: {n} + {h} pairs, {pcfg.sampler.nfe} NFE, {dt:.0f} s "
              f"({summary['pairs']['pairs_per_s']:.0f} pairs/s)", flush=True)
        if a.report:
            Path(a.report).mkdir(parents=True, exist_ok=True)
            save_grid(x0, Path(a.report) / "pairs.png", nrow=8)

    (root / "bench.json").write_text(json.dumps(summary, indent=2) + "\n")
    if a.report:
        Path(a.report).mkdir(parents=True, exist_ok=True)
        (Path(a.report) / "bench.json").write_text(json.dumps(summary, indent=2) + "\n")
        prev = Path(teacher_url) / PREVIEW
        if prev.exists():
            shutil.copy(prev, Path(a.report) / "preview.png")
        metrics = Path(teacher_url) / "metrics.jsonl"
        if metrics.exists():
            shutil.copy(metrics, Path(a.report) / "metrics.jsonl")
    print(json.dumps(summary, indent=2), flush=True)
    return summary


if __name__ == "__main__":
    main()
