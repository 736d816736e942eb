"""A multi-step image student's training step and sampling against the one-step student's (one GPU or the CPU).

The `mini` student of the cifar10 recipe (distance pseudo-Huber here: the step's cost of the distance is the same for
both), trained on a synthetic pair store with K trajectory snapshots: the one-step student on the engine's default
path (a CUDA graph on one GPU) and the multi-step student (``nfe_train``, anchors of ``--rho``) eagerly (its default)
and, on a GPU, as a captured CUDA graph (``train.cuda_graphs=True``), each for ``--steps`` timed steps after warm-up;
then one batch of samples at each NFE. Prints and writes one JSON record.

    python bench/multistep_image_step.py [--device cuda] [--steps 50] [--batch 256] [--nfe 1,2 --rho 3] [--out R.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--snapshots", type=int, default=3)
    p.add_argument("--nfe", default="1,2,4")
    p.add_argument("--rows", type=int, default=64, help="model.trajectory_rows")
    p.add_argument("--rho", type=float, default=1.0, help="model.anchor_rho")
    p.add_argument("--output", action="store_true", help="model.trajectory_output")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    from pipeline.training.image_data import write_synthetic_store
    from pipeline.training.image_train import ImageTrainer
    from storage_schemas.distill_image import distill_image_preset
    dev = torch.device(a.device)
    nfe = tuple(int(v) for v in a.nfe.split(","))
    mini = distill_image_preset("mini").student
    base = mini.model.model_copy(update={"distance": "pseudo-huber", "adv_weight": 0.0})
    tc = mini.train.model_copy(update={"device": dev.type, "batch_size": a.batch})
    if dev.type == "cpu":
        tc = tc.model_copy(update={"precision": "fp32", "cuda_graphs": None})
    record = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "batch": a.batch,
              "snapshots": a.snapshots, "nfe_train": list(nfe), "trajectory_rows": a.rows, "anchor_rho": a.rho,
              "trajectory_output": a.output, "steps": a.steps}
    with tempfile.TemporaryDirectory() as d:
        store = write_synthetic_store(str(Path(d) / "p"), 4 * a.batch, (3, 32, 32), chunk_size=a.batch,
                                      snapshots=a.snapshots)
        data = store.load(store.pair_arrays)
        x = {k: torch.from_numpy(v) for k, v in data.items() if k in ("x_T", "x_0", "x_t")}
        from models.multistep import snapshot_scales
        scales = snapshot_scales(store.manifest.snapshots.axis, store.manifest.snapshots.levels)
        multi = base.model_copy(update={"nfe_train": nfe, "trajectory_rows": a.rows,
                                        "anchor_rho": a.rho if a.rho != 1 else None,
                                        "trajectory_output": a.output or None})
        runs = [("one_step", base, 1, tc), ("multi_step", multi, a.snapshots + 1, tc)]
        if dev.type == "cuda":
            runs.append(("multi_step_graph", multi, a.snapshots + 1, tc.model_copy(update={"cuda_graphs": True})))
        for name, cfg, n, run_tc in runs:
            tr = ImageTrainer(cfg, run_tc, dev, intervals=n, snapshot_scales=scales if n > 1 else None)
            for i in range(a.warmup + a.steps):
                if i == a.warmup:
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    t0 = time.perf_counter()
                s = slice((i % 4) * a.batch, (i % 4 + 1) * a.batch)
                tr.train_step(x["x_T"][s], x["x_0"][s], None, x["x_t"][s] if tr.multi else None)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            record[f"{name}_ms_per_step"] = round(1000 * (time.perf_counter() - t0) / a.steps, 2)
            record[f"{name}_losses"] = {k: round(v, 5) for k, v in tr.pop_metrics().items()}
            record[f"{name}_cuda_graphs"] = bool(tr.cuda_graphs)
            if name == "multi_step":
                model = tr.ema.eval()
                xT = x["x_T"][:a.batch].to(dev)
                for m in nfe:
                    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                        model.generate(xT, None, m)
                        if dev.type == "cuda":
                            torch.cuda.synchronize(dev)
                        t0 = time.perf_counter()
                        out = model.generate(xT, None, m)
                        if dev.type == "cuda":
                            torch.cuda.synchronize(dev)
                    record[f"sample_nfe{m}_images_per_s"] = round(a.batch / (time.perf_counter() - t0), 1)
                    record[f"sample_nfe{m}_finite"] = bool(torch.isfinite(out.float()).all())
            del tr
    for name in ("multi_step", "multi_step_graph"):
        if f"{name}_ms_per_step" in record:
            record[f"{name}_ratio"] = round(record[f"{name}_ms_per_step"] / record["one_step_ms_per_step"], 3)
    print(json.dumps(record))
    if a.out:
        Path(a.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
