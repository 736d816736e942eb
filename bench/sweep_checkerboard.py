"""Sweep of checkerboard student/teacher settings: quality (in-cell fraction, held-out pair MSE) as a
function of optimiser steps, to choose CPU-sized presets. Runs configs in parallel processes.

    python bench/sweep_checkerboard.py --data checkerboard-fm-trajectories.npy --out sweep.jsonl
"""
from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.checkerboard import in_cell, sample_checkerboard  # noqa: E402
from models.flow_matching import VelocityMLP, cond_ot_loss  # noqa: E402
from models.kdm2d import KDM2D  # noqa: E402
from models.losses import kdm_losses  # noqa: E402
from models.samplers import integrate_ode  # noqa: E402

MILESTONES = (500, 1000, 2000, 3000, 4000, 6000, 8000, 12000, 16000, 20000)


def student_job(args):
    data, cfg, device = args
    torch.manual_seed(0)
    d = np.load(data)
    x_T, x_0 = torch.from_numpy(d[0][:40000]).to(device), torch.from_numpy(d[-1][:40000]).to(device)
    h_T, h_0 = torch.from_numpy(d[0][40000:]).to(device), torch.from_numpy(d[-1][40000:]).to(device)
    m = KDM2D(hidden=cfg["hidden"], latent_dim=cfg["latent"], encoder_layers=cfg["layers"],
              decoder_layers=cfg["layers"]).to(device)
    ema = KDM2D(hidden=cfg["hidden"], latent_dim=cfg["latent"], encoder_layers=cfg["layers"],
                decoder_layers=cfg["layers"]).to(device)
    ema.load_state_dict(m.state_dict())
    opt = torch.optim.Adam(m.parameters(), cfg["lr"])
    g = torch.Generator(device=device).manual_seed(0)
    rows, t0 = [], time.time()
    for step in range(1, max(MILESTONES) + 1):
        if step > cfg["steps"]:
            break
        idx = torch.randint(0, x_0.shape[0], (cfg["batch"],), generator=g, device=device)
        out = m(x_0[idx], x_T[idx])
        loss = kdm_losses(x_0[idx], out, use_pred_loss=cfg["pred"])["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(m.parameters()), 1 - cfg["ema"])
        if step in MILESTONES:
            with torch.no_grad():
                row = dict(cfg, step=step, secs=time.time() - t0)
                for name, net in (("raw", m), ("ema", ema)):
                    s = net.generate(h_T)
                    row[f"{name}_incell"] = in_cell(s.cpu()).float().mean().item()
                    row[f"{name}_mse"] = ((s - h_0) ** 2).mean().item()
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def teacher_job(args):
    _, cfg, device = args
    torch.manual_seed(0)
    m = VelocityMLP(2, cfg["hidden"], cfg["layers"]).to(device)
    opt = torch.optim.Adam(m.parameters(), cfg["lr"])
    g = torch.Generator().manual_seed(1)
    rows = []
    for step in range(1, cfg["steps"] + 1):
        x = sample_checkerboard(cfg["batch"], g).to(device)
        loss = cond_ot_loss(m, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step in MILESTONES:
            with torch.no_grad():
                z = torch.randn(20000, 2, generator=torch.Generator().manual_seed(5)).to(device)
                x0 = integrate_ode(m, z, 20, "midpoint").cpu()
            row = dict(cfg, kind="teacher", step=step, incell=in_cell(x0).float().mean().item())
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--procs", type=int, default=8)
    a = p.parse_args()
    jobs = []
    for hidden, latent, batch, lr, pred in itertools.product((128, 256), (64, 256), (512, 2048), (1e-3, 3e-3), (True,)):
        jobs.append((student_job, dict(kind="student", hidden=hidden, latent=latent, layers=5, batch=batch, lr=lr,
                                       pred=pred, ema=0.999, steps=20000)))
    for pred in (False,):
        jobs.append((student_job, dict(kind="student", hidden=256, latent=256, layers=5, batch=4096, lr=3e-4,
                                       pred=pred, ema=0.999, steps=20000)))
    jobs.append((student_job, dict(kind="student", hidden=256, latent=256, layers=5, batch=4096, lr=3e-4,
                                   pred=True, ema=0.999, steps=20000)))
    for hidden, layers, batch in itertools.product((128, 256, 512), (3, 4), (1024, 4096)):
        jobs.append((teacher_job, dict(hidden=hidden, layers=layers, batch=batch, lr=1e-3, steps=8000)))
    ctx = mp.get_context("spawn")
    with ctx.Pool(a.procs) as pool, open(a.out, "w") as f:
        results = [pool.apply_async(fn, ((a.data, cfg, a.device),)) for fn, cfg in jobs]
        for r in results:
            for row in r.get():
                f.write(json.dumps(row) + "\n")
                f.flush()


if __name__ == "__main__":
    main()
