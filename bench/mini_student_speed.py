#!/usr/bin/env python
"""Training speed of the CIFAR-10 ``mini`` preset's student, as the preset sets it up, against variants.

    python bench/mini_student_speed.py --steps 200 --out docs/bench/mini-student-speed.json

On a synthetic pair store of CIFAR-10 shape (random pairs: the speed of a step does not depend on the
data) and a perceptual network trained for one epoch on random images (speed only: its quality does not
change the step's cost), it trains the preset's student section (``distill_image_preset("mini")``) for
``--steps`` steps per row, through the product's ``train_image_student``, and reports the pairs/s of the
logged intervals after the first (the CUDA-graph capture and cuDNN autotuning fall in the first):

* ``preset``: the mini student as users get it (lpips-own, bf16, NCHW, whole-step CUDA graph);
* ``preset+D``: the same with the discriminator on (what the adversarial term costs per step);
* ``fp32``: the earlier mini engine settings (precision fp32, the same layout and graph);
* ``pseudo-huber``: the earlier distance (what lpips-own costs per step).

Per row: ``pairs_per_s``, the median wall-clock rate of the logged intervals after the first, and
``steady_pairs_per_s``, the figure the student stage itself logs and records in its manifest (its intervals
after warm-up, checkpoint writes and hooks left out), which ``bench/bench_kdm_image.py --student mini``
times as a bare step. From the rates it prints the student stage's time at the preset's step count.
``--tiny`` swaps in the benchmarks' tiny U-Net and a narrow perceptual network (a CPU check of the plumbing).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--pairs", type=int, default=8192)
    p.add_argument("--device", default="cuda")
    p.add_argument("--rows", default="preset,preset+D,fp32,pseudo-huber")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the preset's; smaller for a CPU check)")
    p.add_argument("--tiny", action="store_true", help="tiny U-Nets and perceptual network (CPU check)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    import numpy as np
    import torch
    from pipeline.training.image_data import write_synthetic_store
    from pipeline.training.image_train import read_image_student_manifest, train_image_student
    from pipeline.training.perceptual import train_perceptual_net_arrays
    from storage_schemas.distill_image import distill_image_preset
    from storage_schemas.perceptual import PerceptualNetTrainConfig

    mini = distill_image_preset("mini").student
    if a.tiny:
        sys.path.insert(0, str(REPO / "bench"))
        from bench_kdm_image import TINY_UNET
        mini = mini.model_copy(update={"model": mini.model.model_copy(update={"unet": TINY_UNET})})
    variants = {
        "preset": ({}, {}),
        "preset+D": ({"adv_weight": 0.005}, {}),
        "fp32": ({}, {"precision": "fp32"}),
        "pseudo-huber": ({"distance": "pseudo-huber"}, {}),
    }
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        store = str(Path(d, "pairs"))
        write_synthetic_store(store, a.pairs, (3, 32, 32), chunk_size=min(2048, a.pairs))
        rng = np.random.default_rng(0)
        n_img = 64 if a.tiny else 2048
        imgs = rng.integers(0, 256, (n_img, 3, 32, 32), dtype=np.uint8)
        pnet = str(Path(d, "pnet"))
        pcfg = PerceptualNetTrainConfig(epochs=1, **({"width": 4, "batch_size": 32} if a.tiny else {}))
        train_perceptual_net_arrays(imgs, rng.integers(0, 10, n_img), pcfg, pnet, device=a.device, progress=False)
        for name in a.rows.split(","):
            mchg, tchg = variants[name]
            model = mini.model.model_copy(update=mchg)
            model = type(model).model_validate(model.model_dump())
            train = mini.train.model_copy(update={"steps": a.steps, "log_every": max(a.steps // 10, 1),
                                                  "batch_size": a.batch or mini.train.batch_size,
                                                  "checkpoint_every": 10**9, "device": a.device,
                                                  "perceptual_net": pnet if model.distance == "lpips-own" else None,
                                                  **tchg})
            recs: list[dict] = []
            t = time.time()
            run = str(Path(d, f"run-{name}"))
            train_image_student(store, model, train, run, device=a.device, progress=False,
                                on_log=recs.append, max_steps=a.steps)
            rates = [r["pairs_per_s"] for r in recs[1:]] or [r["pairs_per_s"] for r in recs]
            rate = statistics.median(rates)
            steady = read_image_student_manifest(run).steady_pairs_per_s
            rows[name] = {"pairs_per_s": round(rate, 1), "steps_per_s": round(rate / train.batch_size, 2),
                          "steady_pairs_per_s": steady,
                          "interval_train_pairs_per_s": [r.get("train_pairs_per_s") for r in recs],
                          "wall_s": round(time.time() - t, 1), "distance": model.distance,
                          "adv_weight": model.adv_weight, "precision": train.precision,
                          "preset_steps_s": round(mini.train.steps * train.batch_size / rate, 1)}
            print(name, json.dumps(rows[name]), flush=True)
    rec = {"device": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "cpu",
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "steps": a.steps,
           "batch": a.batch or mini.train.batch_size, "preset_steps": mini.train.steps, "rows": rows}
    print(json.dumps(rec, indent=2))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(rec, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
