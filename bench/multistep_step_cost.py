"""Cost of a multi-step student's training step against the one-step student's, interleaved.

Builds the students of two student presets (default `checkerboard-import` and `checkerboard-import-multistep`) and
times their training steps (forward, backward, Adam, EMA) on the same machine in alternating blocks, so that a
shared machine's changing load hits both alike; prints one JSON line with ms per step of each and the ratio.
The data are random trajectories of the official grid (8 snapshots); the step's cost does not depend on them.

    python bench/multistep_step_cost.py [--one checkerboard-import] [--multi checkerboard-import-multistep] \
        [--blocks 6] [--steps 40] [--threads 1] [--set model.trajectory_every=4]

``--set`` changes the multi-step preset (``model.trajectory_every`` = k: the trajectory terms on the last step of
every k, as the trainers run them; keep ``--steps`` a multiple of k).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models import multistep  # noqa: E402
from models.kdm2d import KDM2D  # noqa: E402
from models.losses import kdm_losses  # noqa: E402
from pipeline import presets  # noqa: E402
from storage_schemas.multistep import trains_trajectory  # noqa: E402


class Stepper:
    def __init__(self, cfg, intervals: int, traj: torch.Tensor):
        torch.manual_seed(0)
        self.cfg = cfg
        self.multi = cfg.model.nfe_train is not None
        n = intervals if self.multi else 1
        self.model, self.ema = KDM2D.from_config(cfg.model, n), KDM2D.from_config(cfg.model, n)
        self.ema.requires_grad_(False)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.train.lr)
        self.used = multistep.trained_indices(self.model) if self.multi else [0, intervals]
        self.traj = traj[:, self.used].contiguous()
        self.g = {k: torch.Generator().manual_seed(i) for i, k in enumerate(("data", "noise", "traj"))}
        self.steps = 0

    def step(self) -> None:
        b = self.traj[torch.randint(0, len(self.traj), (self.cfg.train.batch_size,), generator=self.g["data"])]
        if self.multi and trains_trajectory(self.cfg.model.trajectory_every, self.steps):
            fwd = multistep.trajectory_forward(self.model, {i: b[:, k] for k, i in enumerate(self.used)},
                                               decode_push=False, generator=self.g["noise"],
                                               aux_rows=self.cfg.model.trajectory_rows, traj_generator=self.g["traj"])
            loss = multistep.trajectory_losses(fwd, use_pred_loss=False)["total"]
        else:
            x0, xT = b[:, -1], b[:, 0]          # the batch's grid columns run from x_T to x_0
            out = self.model(x0, xT, decode_push=False, generator=self.g["noise"])
            loss = kdm_losses(x0, out, use_pred_loss=False)["total"]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()), 0.001)
        self.steps += 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", default="checkerboard-import")
    p.add_argument("--multi", default="checkerboard-import-multistep")
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--steps", type=int, default=40, help="steps per block")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a change of the --multi preset")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    intervals = 9
    traj = torch.randn(40_000, intervals + 1, 2, generator=torch.Generator().manual_seed(0))
    runs = {name: Stepper(presets.load("student", name, sets=a.set if name == a.multi else []), intervals, traj)
            for name in (a.one, a.multi)}
    for s in runs.values():          # warm-up
        for _ in range(5):
            s.step()
    secs = {name: 0.0 for name in runs}
    for _ in range(a.blocks):
        for name, s in runs.items():
            t0 = time.perf_counter()
            for _ in range(a.steps):
                s.step()
            secs[name] += time.perf_counter() - t0
    ms = {name: 1000 * t / (a.blocks * a.steps) for name, t in secs.items()}
    print(json.dumps({"ms_per_step": {k: round(v, 2) for k, v in ms.items()},
                      "ratio": round(ms[a.multi] / ms[a.one], 3), "steps": a.blocks * a.steps, "threads": a.threads,
                      "multi_sets": a.set}))


if __name__ == "__main__":
    main()
