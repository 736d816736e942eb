"""Training loop for 2-D KDM students: Adam, EMA, atomic resumable checkpoints, metrics JSONL.

Run directory (``--out RUN``):
  config.json                      the run config and the pair store it trains on (written first)
  metrics.jsonl                    one JSON line per logged step
  checkpoints/step-NNNNNNNN/       model + EMA (safetensors), optimizer + RNG state, step; written under
                                   a temporary name and renamed, so a kill never leaves a torn checkpoint
  student.safetensors, manifest.json   the EMA weights and the manifest, written when training ends
A killed run restarted with the same command resumes from its newest checkpoint and ends with the same
weights as an uninterrupted run (same device and thread count). With ``model.nfe_train`` the student is
multi-step (``models.multistep``): each batch is whole trajectories (x_T, the anchors' snapshots x_t, x_0)
and the loss is ``models.multistep.trajectory_forward``'s (with ``model.trajectory_every`` = k on every k-th step
only; the other steps are the one-step student's). At a remote URL (``s3://...``) the run
trains in a local temporary directory mirrored to ``<url>.partial`` (pipeline.storage.run_mirror) and resumes
from the checkpoints stored there.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from models import multistep
from models.kdm2d import KDM2D
from models.losses import kdm_losses
from storage_schemas import (StudentManifest, StudentRunConfig, code_version,
                             utc_now)
from storage_schemas.multistep import trains_trajectory

from pipeline.storage import artifacts
from pipeline.storage.manifests import read_student_manifest  # noqa: F401 (re-exported)
from pipeline.storage import checkpoints
from pipeline.devices import resolve_device
from pipeline.errors import KDMError
from pipeline.storage.pairstore import PairStore
from pipeline.storage.run_mirror import RunMirror
from pipeline.training.versions import run_version, run_version_inputs  # noqa: F401 (re-exported)

CONFIG_FILE = artifacts.RUN_CONFIG
WEIGHTS_FILE = "student.safetensors"


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    e, m = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(e, m, 1.0 - decay)


def _rng_states(gens: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    return {name: g.get_state() for name, g in gens.items()} | {"torch_cpu": torch.get_rng_state()}


def _set_rng_states(gens: dict[str, torch.Generator], rng: dict[str, torch.Tensor]) -> None:
    for name, g in gens.items():
        g.set_state(rng[name])
    torch.set_rng_state(rng["torch_cpu"])


def train_student(pairs_url: str, cfg: StudentRunConfig, out: str, progress: bool = True,
                  on_log: Optional[Callable[[dict], None]] = None, stop_after: Optional[int] = None,
                  on_resume: Optional[Callable[[int], None]] = None) -> str:
    """Train (or resume, or find finished) a KDM student on the train split of ``pairs_url``.

    A local ``out`` is the run directory itself. A remote ``out`` (``s3://...``) is trained in a fresh
    local temporary directory (under ``TMPDIR``) mirrored to ``<out>.partial`` (pipeline.storage.run_mirror):
    checkpoints are pushed as they are written, a restarted run resumes from the newest remote one, and
    the finished run is committed to ``out`` with its manifest last.

    ``stop_after`` ends the process-local loop early (used to simulate an interruption in tests);
    ``on_resume(step)`` is called when training continues from a checkpoint. Returns the run version.
    """
    store = PairStore.open(pairs_url)
    m = store.manifest
    if len(m.sample_shape) != 1 or m.sample_shape[0] != cfg.model.dim:
        raise KDMError(f"pairs {pairs_url} have sample shape {m.sample_shape}; model.dim={cfg.model.dim} "
                       f"expects ({cfg.model.dim},)")
    if m.count == 0:
        raise KDMError(f"pairs {pairs_url} hold no train pairs; generate or import a non-empty store")
    check_trajectory(cfg, m, pairs_url)
    version = run_version(m.version, cfg)
    # a local run directory is written in place (resumed below); a remote one: a cut-off commit is finished
    if (artifacts.committed(out) or not artifacts.is_local(out)) and \
            artifacts.check_target(out, version, read_student_manifest):
        return version
    args = dict(store=store, pairs_url=pairs_url, cfg=cfg, version=version, progress=progress, on_log=on_log,
                stop_after=stop_after, on_resume=on_resume)
    if artifacts.is_local(out):
        with artifacts.writer_lock(out, "kdm train"):
            _train_run(artifacts.local_path(out), out, **args)
        return version
    mirror = RunMirror(out, run_files=(CONFIG_FILE, checkpoints.METRICS_FILE))
    with tempfile.TemporaryDirectory(prefix="kdm-student-") as work:
        run = Path(work)
        mirror.pull(run)
        if _train_run(run, out, on_checkpoint=mirror.push_checkpoint, **args):
            mirror.commit(run, final_files=(WEIGHTS_FILE, artifacts.MANIFEST))
    return version


def check_trajectory(cfg: StudentRunConfig, m, pairs_url: str) -> int:
    """The intervals of the grid a multi-step student trains on (1: one-step); KDMError when the store's
    snapshots cannot serve ``model.nfe_train``."""
    nfe = cfg.model.nfe_train
    if nfe is None:
        return 1
    n = m.snapshots.count + 1 if m.snapshots is not None else 1
    if max(nfe) > n:
        have = (f"keeps {m.snapshots.count} trajectory snapshot(s), {n} intervals" if m.snapshots else
                "keeps no trajectory snapshots")
        raise KDMError(f"model.nfe_train {list(nfe)} needs a pair store whose trajectories have at least {max(nfe)} "
                       f"intervals; {pairs_url} {have}: generate pairs with --snapshots K (K >= {max(nfe) - 1}) or "
                       f"import with --snapshots all, or lower nfe_train")
    return n


def _train_run(run: Path, out: str, store: PairStore, pairs_url: str, cfg: StudentRunConfig, version: str,
               progress: bool, on_log: Optional[Callable[[dict], None]], stop_after: Optional[int],
               on_resume: Optional[Callable[[int], None]],
               on_checkpoint: Optional[Callable[[Path, Path, int], None]] = None) -> bool:
    """Train in the local run directory ``run``; True once its manifest is written, False when
    ``stop_after`` ended the loop first. ``on_checkpoint(run, checkpoint, keep)`` follows every
    checkpoint."""
    m = store.manifest
    intervals = check_trajectory(cfg, m, pairs_url)
    multi = cfg.model.nfe_train is not None
    data = store.load_all()   # every chunk checked as it is read, then the content hash
    data = {k: data[k] for k in (("x_T", "x_t", "x_0") if multi and intervals > 1 else ("x_T", "x_0"))}
    bad = {k: int((~np.isfinite(v)).any(axis=tuple(range(1, v.ndim))).sum()) for k, v in data.items()}
    if any(bad.values()):
        raise KDMError(f"pairs {pairs_url} hold non-finite values (rows with NaN/Inf: " +
                       ", ".join(f"{k} {n}" for k, n in bad.items() if n) + "); drop them with `kdm pairs "
                       f"filter --pairs {pairs_url} --out NEW` and train on NEW")
    checkpoints.claim_run(run / CONFIG_FILE, version,
                          {"pairs": pairs_url, "pairs_version": m.version, "pairs_content_hash": m.content_hash,
                           "config": cfg.model_dump(mode="json")},
                          holds=f"{out} holds a run of another config/pairs")

    tc = cfg.train
    device = resolve_device(tc.device)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    model = KDM2D.from_config(cfg.model, intervals).to(device)
    ema = KDM2D.from_config(cfg.model, intervals).to(device)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr)
    gens = {"data": torch.Generator().manual_seed(tc.seed + 1),
            "noise": torch.Generator(device=device).manual_seed(tc.seed + 2)}
    if multi:     # the trajectory terms' own latent noise: the one-step terms see the one-step student's stream
        gens["trajectory"] = torch.Generator(device=device).manual_seed(tc.seed + 3)
    step = 0
    ck = checkpoints.latest_checkpoint(run)
    if ck is not None:
        step = checkpoints.load_checkpoint(ck, device, {"model": model, "ema": ema}, {"optimizer": opt})["step"]
        _set_rng_states(gens, checkpoints.load_object(ck, "rng"))
        if on_resume is not None:
            on_resume(step)
    x_T = torch.from_numpy(data["x_T"]).to(device)
    x_0 = torch.from_numpy(data["x_0"]).to(device)
    n = x_0.shape[0]
    if multi:     # (N, n + 1, D): x_T, the snapshots, x_0
        traj = torch.cat([x_T[:, None], torch.from_numpy(data["x_t"]).to(device), x_0[:, None]], dim=1) \
            if intervals > 1 else torch.stack([x_T, x_0], dim=1)
        used = multistep.trained_indices(model)
        traj = traj[:, used].contiguous()          # the anchors of the trained schedules only
    model.train()
    metrics_path = run / checkpoints.METRICS_FILE
    losses: dict[str, float] = {}
    bar = tqdm(total=tc.steps, initial=step, desc="train", disable=not progress, mininterval=1.0)
    with checkpoints.MetricsLog(metrics_path, step, tc.batch_size) as log:
        while step < tc.steps:
            if stop_after is not None and step >= stop_after:
                return False
            for group in opt.param_groups:
                group["lr"] = tc.lr_at(step)
            idx = torch.randint(0, n, (tc.batch_size,), generator=gens["data"]).to(device)
            logging_step = (step + 1) % tc.log_every == 0 or step + 1 == tc.steps
            # Without L_pred the pushed latent is decoded only when L_pred is logged (no RNG is used
            # by the decoder, so the run is the same either way).
            if multi and trains_trajectory(cfg.model.trajectory_every, step):
                batch = traj[idx]
                fwd = multistep.trajectory_forward(model, {i: batch[:, k] for k, i in enumerate(used)},
                                                   decode_push=cfg.model.use_pred_loss or logging_step,
                                                   generator=gens["noise"], spectral=cfg.model.spectral_loss,
                                                   aux_rows=cfg.model.trajectory_rows,
                                                   traj_generator=gens["trajectory"],
                                                   output=bool(cfg.model.trajectory_output))
                terms = multistep.trajectory_losses(fwd, use_pred_loss=cfg.model.use_pred_loss)
            else:
                out_ = model(x_0[idx], x_T[idx], decode_push=cfg.model.use_pred_loss or logging_step,
                             generator=gens["noise"], spectral=cfg.model.spectral_loss)
                terms = kdm_losses(x_0[idx], out_, use_pred_loss=cfg.model.use_pred_loss)
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
                rec = log.record(step, {f"loss_{k}": v for k, v in losses.items()} | {"lr": tc.lr_at(step - 1)})
                log.write(rec)
                bar.set_postfix(loss=f"{losses['total']:.4f}")
                if on_log is not None:
                    on_log(rec)
            bar.update(1)
            if step % tc.checkpoint_every == 0 or step == tc.steps:
                ck = checkpoints.save_checkpoint(run, step, tc.keep_checkpoints, modules={"model": model, "ema": ema},
                                                 objects={"optimizer": opt.state_dict(), "rng": _rng_states(gens)})
                if on_checkpoint is not None:
                    on_checkpoint(run, ck, tc.keep_checkpoints)
    bar.close()
    if not losses:   # resumed from the final checkpoint: the last logged losses are the final ones
        losses = checkpoints.last_losses(metrics_path)
    weights = run / WEIGHTS_FILE
    checkpoints.save_weights(ema, weights)
    manifest = StudentManifest(
        version=version, version_inputs=run_version_inputs(m.version, cfg), model=cfg.model, train=cfg.train,
        preset=cfg.preset, pairs_version=m.version, snapshots=m.snapshots if multi and intervals > 1 else None,
        pairs_content_hash=m.content_hash, teacher_id=m.teacher.id if m.teacher else None, steps_done=step,
        weights_sha256=artifacts.sha256_file(str(weights)), trainable_parameters=count_parameters(model),
        final_losses=losses, train_seconds=time.time() - log.t_start, code_version=code_version(), created=utc_now())
    artifacts.write_json(str(run / artifacts.MANIFEST), manifest)
    return True
