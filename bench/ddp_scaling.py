#!/usr/bin/env python
"""DDP scaling of the image training engine: `kdm train-image` under torchrun on 1 and N GPUs.

    python bench/ddp_scaling.py --gpus 2 --out runs/ddp.json
    python bench/ddp_scaling.py --device cpu --gpus 2 --tiny --steps 6      # smoke test (gloo on the CPU)

Runs (i) 1 process at the global batch, (ii) N processes at the same global batch (strong scaling: each
takes batch / N) and (iii) N processes at N x the batch (weak scaling), each for ``--steps`` steps on a
synthetic pair store, and reads pairs/s from the run's metrics log (median of the records after the first,
which carries the warm-up). Efficiency = pairs/s(N) / (N x pairs/s(1)). Every scaling run is eager (DDP
steps are); on a GPU the 1-process CUDA-graph step (the single-GPU default) is timed beside them.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run(store: str, out: Path, nproc: int, batch: int, steps: int, device: str, sets: list[str]) -> float:
    log_every = max(steps // 6, 1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "pipeline.cli", "train-image", "--pairs", store, "--preset", "cifar10-uncond", "--out", str(out),
           "--device", device, "--max-steps", str(steps), "-q",
           "--set", f"train.batch_size={batch}", "--set", "train.steps=1000000", "--set", f"train.log_every={log_every}",
           "--set", f"train.checkpoint_every={10**6}", "--set", "model.distance=pseudo-huber", *sets]
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
    subprocess.run(cmd, check=True, cwd=REPO, env=env)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = sorted(r["pairs_per_s"] for r in recs[1:]) or [r["pairs_per_s"] for r in recs]
    return float(rates[len(rates) // 2])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128, help="global batch of the 1-process run")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny U-Nets (smoke test)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    from pipeline.training.image_data import write_synthetic_store
    sets = ["--set", f"train.device={'cuda' if a.device == 'cuda' else 'cpu'}"]
    if a.tiny:
        sets += ["--set", "model.unet.model_channels=8", "--set", "model.unet.num_blocks=1",
                 "--set", "train.precision=fp32", "--set", "train.threads=1"]
    res: dict = {"gpus": a.gpus, "batch": a.batch, "steps": a.steps, "runs": {}}
    if a.device == "cuda":
        import torch
        res["gpu"] = torch.cuda.get_device_name(0)
        res["torch"] = torch.__version__
    tmp = Path(tempfile.mkdtemp())
    try:
        store = str(tmp / "pairs")
        write_synthetic_store(store, max(20 * a.batch * a.gpus, 4000), chunk_size=1000)
        # The same (eager) engine in every scaling run: DDP steps are eager, so the 1-process baseline is
        # too; the 1-process CUDA-graph step (the single-GPU default) is reported beside them.
        eager = ["--set", "train.cuda_graphs=false"]
        plan = {"1 process": (1, a.batch, eager), f"{a.gpus} processes, same global batch": (a.gpus, a.batch, eager),
                f"{a.gpus} processes, {a.gpus}x batch": (a.gpus, a.batch * a.gpus, eager)}
        if a.device == "cuda":
            plan["1 process, CUDA graph"] = (1, a.batch, [])
        for i, (name, (n, b, extra)) in enumerate(plan.items()):
            rate = run(store, tmp / f"run{i}", n, b, a.steps, a.device, sets + extra)
            res["runs"][name] = {"processes": n, "global_batch": b, "pairs_per_s": rate,
                                 "cuda_graphs": not extra}
            print(f"{name:36s} batch {b:5d}: {rate:10.1f} pairs/s", flush=True)
        base = res["runs"]["1 process"]["pairs_per_s"]
        for r in res["runs"].values():
            r["scaling_efficiency"] = r["pairs_per_s"] / (r["processes"] * base)
            print(f"{r['processes']} x batch {r['global_batch']}: efficiency {r['scaling_efficiency']:.2f}")
    finally:
        shutil.rmtree(tmp)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
