"""Training loop for 2-D KDM students: Adam, EMA, atomic resumable checkpoints, metrics JSONL.

Run directory (``--out RUN``):
  config.json                      the run config and the pair store it trains on (written first)
  metrics.jsonl                    one JSON line per logged step
  checkpoints/step-NNNNNNNN/       model + EMA (safetensors), optimizer + RNG state, step; written under
                                   a temporary name and renamed, so a kill never leaves a torn checkpoint
  student.safetensors, manifest.json   the EMA weights and the manifest, written when training ends
A killed run restarted with the same command resumes from its newest checkpoint and ends with the same
weights as an uninterrupted run (same device and thread count).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from models.kdm2d import KDM2D
from models.losses import kdm_losses
from storage_schemas import (StudentManifest, StudentRunConfig, code_version, recipe_version, stable_hash,
                             utc_now)

from . import artifacts
from .devices import resolve_device
from .errors import ArtifactExists, KDMError
from .pairstore import PairStore

CKPT_DIR = "checkpoints"


def run_version(pairs_version: str, cfg: StudentRunConfig) -> str:
    return "kdm-" + stable_hash(recipe_version(), "train", pairs_version,
                                cfg.model_dump(mode="json", exclude={"preset": True, "train": {"device", "threads", "log_every"}}))


def read_student_manifest(url: str) -> StudentManifest:
    return artifacts.read_model(artifacts.join(url, artifacts.MANIFEST), StudentManifest)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    e, m = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(e, m, 1.0 - decay)


def _latest_checkpoint(run: Path) -> Optional[Path]:
    ck = run / CKPT_DIR
    if not ck.is_dir():
        return None
    done = sorted(p for p in ck.iterdir() if p.name.startswith("step-") and (p / "state.json").exists())
    return done[-1] if done else None


def _save_checkpoint(run: Path, step: int, model, ema, opt, gens: dict[str, torch.Generator], keep: int) -> None:
    final = run / CKPT_DIR / f"step-{step:08d}"
    tmp = run / CKPT_DIR / f".tmp-step-{step:08d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}, str(tmp / "ema.safetensors"))
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    torch.save({name: g.get_state() for name, g in gens.items()} | {"torch_cpu": torch.get_rng_state()},
               tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step}))   # marks the checkpoint complete
    os.replace(tmp, final)
    olds = sorted(p for p in (run / CKPT_DIR).iterdir() if p.name.startswith("step-"))
    for p in olds[:-keep]:
        shutil.rmtree(p)


def _read_metrics(path: Path) -> list[dict]:
    """The complete records of a metrics file; a line torn by a kill mid-write is skipped."""
    if not path.exists():
        return []
    records = []
    for ln in path.read_text().splitlines():
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            records.append(rec)
    return records


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.exists():
        return
    path.write_text("".join(json.dumps(r) + "\n" for r in _read_metrics(path) if r["step"] <= step))


def train_student(pairs_url: str, cfg: StudentRunConfig, out: str, progress: bool = True,
                  on_log: Optional[Callable[[dict], None]] = None, stop_after: Optional[int] = None) -> str:
    """Train (or resume, or find finished) a KDM student on the train split of ``pairs_url``.

    ``stop_after`` ends the process-local loop early (used to simulate an interruption in tests).
    Returns the run version.
    """
    store = PairStore.open(pairs_url)
    m = store.manifest
    if len(m.sample_shape) != 1 or m.sample_shape[0] != cfg.model.dim:
        raise KDMError(f"pairs {pairs_url} have sample shape {m.sample_shape}; model.dim={cfg.model.dim} "
                       f"expects ({cfg.model.dim},)")
    version = run_version(m.version, cfg)
    if artifacts.check_target(out, version, read_student_manifest) if artifacts.committed(out) else False:
        return version
    run = artifacts.local_path(out)
    run.mkdir(parents=True, exist_ok=True)
    cfg_file = run / "config.json"
    run_cfg = {"version": version, "pairs": pairs_url, "pairs_version": m.version,
               "pairs_content_hash": m.content_hash, "config": cfg.model_dump(mode="json")}
    if cfg_file.exists():
        old = json.loads(cfg_file.read_text())
        if old.get("version") != version:
            raise ArtifactExists(f"{out} holds a run of another config/pairs (version {old.get('version')}, this "
                                 f"is {version}); choose another --out to start a new run")
    else:
        cfg_file.write_text(json.dumps(run_cfg, indent=2) + "\n")

    tc = cfg.train
    device = resolve_device(tc.device)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    model = KDM2D.from_config(cfg.model).to(device)
    ema = KDM2D.from_config(cfg.model).to(device)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr)
    gens = {"data": torch.Generator().manual_seed(tc.seed + 1),
            "noise": torch.Generator(device=device).manual_seed(tc.seed + 2)}
    step = 0
    ck = _latest_checkpoint(run)
    if ck is not None:
        model.load_state_dict(load_file(str(ck / "model.safetensors"), device=str(device)))
        ema.load_state_dict(load_file(str(ck / "ema.safetensors"), device=str(device)))
        opt.load_state_dict(torch.load(ck / "optimizer.pt", map_location=device, weights_only=True))
        rng = torch.load(ck / "rng.pt", weights_only=True)
        for name, g in gens.items():
            g.set_state(rng[name])
        torch.set_rng_state(rng["torch_cpu"])
        step = json.loads((ck / "state.json").read_text())["step"]
    metrics_path = run / "metrics.jsonl"
    _truncate_metrics(metrics_path, step)

    data = store.load(("x_T", "x_0"))
    x_T = torch.from_numpy(data["x_T"]).to(device)
    x_0 = torch.from_numpy(data["x_0"]).to(device)
    n = x_0.shape[0]
    model.train()
    t_start, t_last, last_step = time.time(), time.time(), step
    losses: dict[str, float] = {}
    bar = tqdm(total=tc.steps, initial=step, desc="train", disable=not progress, mininterval=1.0)
    with metrics_path.open("a") as log:
        while step < tc.steps:
            if stop_after is not None and step >= stop_after:
                return version
            idx = torch.randint(0, n, (tc.batch_size,), generator=gens["data"]).to(device)
            out_ = model(x_0[idx], x_T[idx], decode_push=True, generator=gens["noise"])
            spectral = model.koopman.spectral_loss(cfg.model.spectral_loss) if cfg.model.spectral_loss != "none" else None
            terms = kdm_losses(x_0[idx], out_, use_pred_loss=cfg.model.use_pred_loss, spectral=spectral)
            opt.zero_grad(set_to_none=True)
            terms["total"].backward()
            opt.step()
            ema_update(ema, model, tc.ema_decay)
            step += 1
            if step % tc.log_every == 0 or step == tc.steps:
                losses = {k: float(v.detach()) for k, v in terms.items()}
                if not np.isfinite(losses["total"]):
                    raise KDMError(f"training diverged at step {step}: losses {losses}; lower train.lr "
                                   f"(now {tc.lr}) or resume from an earlier checkpoint")
                now = time.time()
                rec = {"step": step, **{f"loss_{k}": v for k, v in losses.items()},
                       "pairs_per_s": (step - last_step) * tc.batch_size / max(now - t_last, 1e-9),
                       "elapsed_s": now - t_start}
                t_last, last_step = now, step
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{losses['total']:.4f}")
                if on_log is not None:
                    on_log(rec)
            bar.update(1)
            if step % tc.checkpoint_every == 0 or step == tc.steps:
                _save_checkpoint(run, step, model, ema, opt, gens, tc.keep_checkpoints)
    bar.close()
    if not losses:   # resumed from the final checkpoint: the last logged losses are the final ones
        last = _read_metrics(metrics_path)
        if last:
            losses = {k.removeprefix("loss_"): v for k, v in last[-1].items() if k.startswith("loss_")}
    weights = run / "student.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}, str(weights))
    manifest = StudentManifest(
        version=version, model=cfg.model, train=cfg.train, preset=cfg.preset, pairs_version=m.version,
        pairs_content_hash=m.content_hash, teacher_id=m.teacher.id if m.teacher else None, steps_done=step,
        weights_sha256=artifacts.sha256_file(str(weights)), trainable_parameters=count_parameters(model),
        final_losses=losses, train_seconds=time.time() - t_start, code_version=code_version(), created=utc_now())
    artifacts.write_json(str(run / artifacts.MANIFEST), manifest)
    return version
