"""Sweep of `checkerboard-import` student settings, scored with the product's held-out protocol.

Trains on the train split of a filtered pair store written by `kdm distill --recipe checkerboard
--preset checkerboard-import` and scores the EMA weights exactly as `evaluate_student` does
(storage_schemas.Eval2DConfig defaults: n = 10,000, in-cell fraction, SWD-1 to the first n held-out
x_0, outlier rate, held-out pair MSE), at the milestones given. One JSON line per (config, milestone).

    python bench/sweep_checkerboard_import.py --pairs ROOT/pairs/<filtered> --out sweep.jsonl \
        --config '{"hidden": 256, "latent": 128, "steps": 8000, "schedule": "cosine"}' [--config ...]

Config keys (defaults = the `checkerboard` student preset): hidden, latent, layers, latent_noise,
pred (L_pred on), act ('swish' | 'relu'), fourier (Fourier feature frequencies, 0 = none), fourier_scale, batch, lr,
schedule ('constant' | 'cosine'), warmup, lr_min (fraction of lr at the end of the cosine), steps, ema,
seed, milestones (list of steps at which to score), nfe_train (a multi-step student, e.g. [1, 2]: trained on the
store's trajectory snapshots as `pipeline/training/train2d.py` trains it and scored at each of its NFEs; needs a
store imported with `--snapshots`), trajectory_rows (its model.trajectory_rows), traj_out (its
model.trajectory_output: the output terms of models/multistep.py), anchor_rho (its model.anchor_rho: where the
m-evaluation samples re-anchor), with_heldout (train on the
held-out pairs too, as the official checkerboard model was trained on all 50,000 trajectories: the held-out
scores are then not held out; for a like-for-like comparison with that model only).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models import multistep  # noqa: E402
from models.kdm2d import KDM2D  # noqa: E402
from models.losses import kdm_losses  # noqa: E402
from models.mlp2d import Swish  # noqa: E402
from pipeline.evaluation import metrics2d  # noqa: E402
from pipeline.evaluation.sample import generate, noise_for_seeds  # noqa: E402
from pipeline.storage.pairstore import PairStore  # noqa: E402
from storage_schemas import Eval2DConfig  # noqa: E402

DEFAULTS = dict(hidden=128, latent=64, layers=5, latent_noise=0.4, pred=False, fourier=0, fourier_scale=1.0,
                batch=512, lr=3e-3, schedule="constant", warmup=0, lr_min=0.0, steps=12000, ema=0.999, seed=0,
                milestones=None, act="swish", nfe_train=None, trajectory_rows=None, with_heldout=False,
                traj_out=False, anchor_rho=1.0)


def load_protocol(pairs: str, cfg: Eval2DConfig, with_heldout: bool = False):
    store = PairStore.open(pairs)
    held = store.heldout()
    n = min(cfg.num_samples, len(held), len(store))
    data = store.load_all()
    if with_heldout:
        extra = held.load_all()
        data = {k: np.concatenate([v, extra[k]]) for k, v in data.items() if k in extra}
    hd = {k: held.read(k, 0, n) for k in ("x_T", "x_0")}
    fresh_noise = noise_for_seeds(range(cfg.sample_seed, cfg.sample_seed + n), 2, store.manifest.x_T_scale)
    return data, hd, fresh_noise, store.read("x_0", 0, n)


def score(model, hd, fresh_noise, cfg: Eval2DConfig, nfe: int = 1) -> dict:
    model.eval()
    fresh = generate(model, fresh_noise, nfe=nfe)
    paired = generate(model, hd["x_T"], nfe=nfe)
    m = metrics2d.checkerboard_metrics(fresh, hd["x_0"], swd_projections=cfg.swd_projections, swd_seed=cfg.swd_seed,
                                       eps=cfg.dbscan_eps, min_samples=cfg.dbscan_min_samples, z=cfg.zscore_threshold)
    err = metrics2d.pair_errors(paired, hd["x_0"])
    worst = np.sort(err)[::-1][:max(1, len(err) // 100)]
    return {"incell": m["in_cell_fraction"], "swd": m["swd"], "outliers": m["outlier_rate"],
            "mse": float(np.mean(err)),
            # where the pair MSE comes from: the worst 1 % of the pairs' share of the summed error, the median pair
            "mse_top1pct_share": float(worst.sum() / max(err.sum(), 1e-30)), "mse_median": float(np.median(err)),
            # the standard error of the pair MSE over the held-out pairs (how much another held-out set could move it)
            "mse_stderr": metrics2d.standard_error(err)}


def build(c: dict, intervals: int = 1) -> KDM2D:
    kw = dict(hidden=c["hidden"], latent_dim=c["latent"], encoder_layers=c["layers"], decoder_layers=c["layers"],
              latent_noise=c["latent_noise"], intervals=intervals, nfe_train=tuple(c["nfe_train"] or (1,)),
              anchor_rho=c["anchor_rho"])
    if c["fourier"]:
        kw.update(fourier_features=c["fourier"], fourier_scale=c["fourier_scale"])
    model = KDM2D(**kw)
    if c["act"] != "swish":   # swap the activation modules in place (no parameters)
        for net in (model.x0_encoder, model.xT_encoder, model.decoder):
            net.main = torch.nn.Sequential(*[torch.nn.ReLU() if isinstance(m, Swish) else m for m in net.main])
    return model


def lr_at(c: dict, step: int) -> float:
    if step < c["warmup"]:
        return c["lr"] * (step + 1) / c["warmup"]
    if c["schedule"] == "constant":
        return c["lr"]
    p = (step - c["warmup"]) / max(1, c["steps"] - c["warmup"])
    return c["lr"] * (c["lr_min"] + (1 - c["lr_min"]) * 0.5 * (1 + np.cos(np.pi * p)))


def run(pairs: str, c: dict, out, save: str | None = None, device: str = "cpu") -> None:
    c = {**DEFAULTS, **c}
    ev = Eval2DConfig()
    data, hd, fresh_noise, _ = load_protocol(pairs, ev, c["with_heldout"])
    x_T, x_0 = torch.from_numpy(data["x_T"]).to(device), torch.from_numpy(data["x_0"]).to(device)
    intervals, nfes = (data["x_t"].shape[1] + 1, tuple(c["nfe_train"])) if c["nfe_train"] else (1, (1,))
    torch.manual_seed(c["seed"])
    model, ema = build(c, intervals).to(device), build(c, intervals).to(device)
    if c["nfe_train"]:          # as pipeline/training/train2d.py: the anchors of the trained schedules
        used = multistep.trained_indices(model)
        traj = torch.cat([x_T[:, None], torch.from_numpy(data["x_t"]).to(device), x_0[:, None]], dim=1)
        traj = traj[:, used].contiguous()
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=c["lr"])
    # as pipeline/training/train2d.py: batch indices from a CPU generator, latent noise on the device
    g_data = torch.Generator().manual_seed(c["seed"] + 1)
    g_noise = torch.Generator(device=device).manual_seed(c["seed"] + 2)
    g_traj = torch.Generator(device=device).manual_seed(c["seed"] + 3)
    milestones = set(c["milestones"] or [c["steps"]]) | {c["steps"]}
    t0, n = time.time(), x_0.shape[0]
    for step in range(c["steps"]):
        for group in opt.param_groups:
            group["lr"] = lr_at(c, step)
        idx = torch.randint(0, n, (c["batch"],), generator=g_data).to(device)
        model.train()
        if c["nfe_train"]:
            batch = traj[idx]
            fwd = multistep.trajectory_forward(model, {i: batch[:, k] for k, i in enumerate(used)},
                                               decode_push=c["pred"], generator=g_noise,
                                               aux_rows=c["trajectory_rows"], traj_generator=g_traj,
                                               output=c["traj_out"])
            terms = multistep.trajectory_losses(fwd, use_pred_loss=c["pred"])
        else:
            fwd = model(x_0[idx], x_T[idx], decode_push=c["pred"], generator=g_noise)
            terms = kdm_losses(x_0[idx], fwd, use_pred_loss=c["pred"])
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - c["ema"])
        if step + 1 in milestones:
            secs = time.time() - t0
            with torch.no_grad():
                row = {**c, "device": str(device), "step": step + 1, "train_secs": round(secs, 1), **score(ema, hd, fresh_noise, ev)}
                if len(nfes) > 1:
                    row["by_nfe"] = {m: score(ema, hd, fresh_noise, ev, m) for m in nfes}
            line = json.dumps(row)
            print(line, flush=True)
            out.write(line + "\n")
            out.flush()
            t0 += time.time() - t0 - secs   # scoring time is not training time
    if save:
        torch.save({"config": c, "ema": ema.state_dict()}, save)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", required=True, help="the filtered pair store (with its held-out split)")
    p.add_argument("--out", required=True, help="JSONL to append to")
    p.add_argument("--config", action="append", default=[], help="JSON object of settings (repeatable)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save", help="write the last config's EMA weights (torch.save) here")
    p.add_argument("--device", default="cpu", help="cpu | cuda (a GPU build differs from a CPU build of the same settings in its float arithmetic, as two CPU machines do)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    with open(a.out, "a") as out:
        configs = a.config or ["{}"]
        for i, cfg in enumerate(configs):
            run(a.pairs, json.loads(cfg), out, a.save if i == len(configs) - 1 else None, a.device)


if __name__ == "__main__":
    main()
