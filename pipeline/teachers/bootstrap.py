"""Bootstrap an EDM teacher: train an EDM-preconditioned SongUNet on a prepared image dataset.

EDM's training loop (training/training_loop.py) on one process: EDMLoss (VPLoss/VELoss for the VP/VE
preconditioners), Adam with a linear learning-rate ramp-up counted in images, NaN/Inf gradient
sanitising, EMA with a half-life in images and EDM's ramp-up (half-life <= 5% of the images seen),
loss = sum over pixels / batch. Additions: bf16 autocast of the U-Net on CUDA (fp32 master weights),
TF32, optional torch.compile, and atomic resumable checkpoints as pipeline/training/train2d.py. Every random draw
of a step (batch, flips, sigma, noise, dropout) is seeded from (seed, step), so a run killed at any
point and restarted with the same command ends with the same weights as an uninterrupted run (same
device and settings).

Work directory ``<out>.partial`` (local):
  run.json                       the config, dataset and teacher id (written first)
  metrics.jsonl                  one JSON line per logged step (loss, lr, EMA beta; images/s wall-clock and
                                 in steady state, host CPU and GPU readings)
  checkpoints/step-NNNNNNNN/     net + EMA (safetensors), optimizer, step (renamed into place when complete)
When training ends the EMA weights are written as ``weights.safetensors`` with ``config.json`` (the
EDMNetConfig), ``preview.png`` (EMA samples, 18-step Heun) and ``manifest.json`` last; the checkpoints
are removed and the directory is renamed to ``<out>``: a teacher artifact that pipeline/pairs/generate.py
reads like any other. At a remote URL (``s3://...``) the work directory is a local temporary one
mirrored to ``<out>.partial`` (pipeline.storage.run_mirror): checkpoints are pushed as they are written, a
restarted run resumes from the newest complete one stored there, and the finished artifact (without
checkpoints) is committed to ``<out>`` with its manifest last.
"""
from __future__ import annotations

import copy
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
from tqdm import tqdm

from models.edm import LOSSES
from models.samplers import edm_heun, edm_latents
from storage_schemas import (EDM_TEACHER_RUNTIME_FIELDS, DatasetRef, EDMNetConfig, EDMTeacherTrainConfig,
                             TeacherManifest, VersionInputs, code_version, recipe_version, utc_now)

from pipeline.storage import artifacts
from pipeline.storage import checkpoints
from pipeline import presets
from pipeline.data.datasets import open_image_dataset
from pipeline.devices import resolve_device
from pipeline.errors import KDMError
from pipeline.storage.run_mirror import RunMirror
from pipeline.teachers.flow_matching import build_edm_network, read_teacher_manifest

PREVIEW = "preview.png"


# --- presets -------------------------------------------------------------------------------------------

def load_edm_teacher_config(preset: Optional[str] = None, config_file: Optional[str] = None,
                            sets: Iterable[str] = ()) -> EDMTeacherTrainConfig:
    """An EDMTeacherTrainConfig from ``configs/teacher/<preset>.yaml`` or a YAML file, then ``--set``s."""
    data, source = presets.raw_config("teacher", preset, config_file, defaults="EDM teacher defaults")
    if preset and data.get("kind") != "edm-teacher":
        edm = [n for n in presets.available("teacher") if presets.raw_preset("teacher", n).get("kind") == "edm-teacher"]
        raise KDMError(f"teacher preset {preset!r} is not an EDM image teacher (kind: edm-teacher); "
                       f"EDM presets: {', '.join(edm) or 'none'}")
    return presets.validate_with_sets(EDMTeacherTrainConfig, data, source, sets)


# --- versions and config -------------------------------------------------------------------------------

def net_config(cfg: EDMTeacherTrainConfig, image_shape: tuple[int, int, int], num_classes: int) -> EDMNetConfig:
    c, h, w = image_shape
    if h != w:
        raise KDMError(f"EDM's SongUNet needs square images; the dataset's are {w}x{h}")
    kwargs = {"sigma_data": cfg.sigma_data} if cfg.precond == "edm" and cfg.sigma_data != 0.5 else {}
    try:
        return EDMNetConfig(precond=cfg.precond, img_resolution=h, img_channels=c,
                            label_dim=num_classes if cfg.use_labels else 0, precond_kwargs=kwargs, unet=cfg.unet)
    except ValueError as e:
        raise KDMError(f"the teacher config does not fit the dataset ({w}x{h}, {c} channels): {e}") from None


def bootstrap_version_inputs(dataset_content_hash: str, cfg: EDMTeacherTrainConfig) -> VersionInputs:
    return VersionInputs.of("edm", recipe_version(), "teacher-bootstrap", dataset_content_hash,
                            cfg.model_dump(mode="json", exclude=set(EDM_TEACHER_RUNTIME_FIELDS)))


def bootstrap_version(dataset_content_hash: str, cfg: EDMTeacherTrainConfig) -> str:
    return bootstrap_version_inputs(dataset_content_hash, cfg).version


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + 12_345) % (1 << 62)


class _EpochIndex:
    """Sample indices of global positions [a, b): epoch e is a permutation drawn from (seed, e) on the CPU,
    kept on ``device`` (one copy per epoch, so a step does not wait for a host-to-device transfer)."""

    def __init__(self, n: int, seed: int, device: torch.device):
        self.n, self.seed, self.device = n, seed, device
        self._cache: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            keep = {e: p for e, p in self._cache.items() if e == epoch - 1}
            self._cache = {**keep, epoch: torch.randperm(self.n, generator=g).to(self.device)}
        return self._cache[epoch]

    def take(self, a: int, b: int) -> torch.Tensor:
        parts = []
        while a < b:
            e, off = divmod(a, self.n)
            k = min(b - a, self.n - off)
            parts.append(self._perm(e)[off:off + k])
            a += k
        return parts[0] if len(parts) == 1 else torch.cat(parts)


# --- preview -------------------------------------------------------------------------------------------

@torch.no_grad()
def preview_samples(net, num: int, device: torch.device, steps: int = 18) -> np.ndarray:
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    eps, labels = edm_latents(range(num), shape, net.label_dim)
    onehot = torch.eye(net.label_dim, device=device)[labels.to(device)] if labels is not None else None
    x0 = edm_heun(net, (eps * 80.0).to(device), onehot, num_steps=steps)
    return x0.to(torch.float32).cpu().numpy()


# --- training ------------------------------------------------------------------------------------------

def train_edm_teacher(dataset_url: str, cfg: EDMTeacherTrainConfig, out: str, progress: bool = True,
                      on_log: Optional[Callable[[dict], None]] = None,
                      stop_after: Optional[int] = None,
                      on_resume: Optional[Callable[[int], None]] = None) -> Optional[TeacherManifest]:
    """Train (or resume, or find finished) an EDM teacher on the train split of ``dataset_url``.

    Returns the teacher manifest; None when ``stop_after`` ended the loop early (used by tests to
    simulate an interruption). ``on_resume(step)`` is called when training continues from a checkpoint.
    A remote ``out`` trains in a local temporary directory mirrored to ``<out>.partial``.
    """
    ds = open_image_dataset(dataset_url)
    dm = ds.manifest
    if "train" not in dm.splits:
        raise KDMError(f"dataset {dataset_url} has no train split (splits: {', '.join(dm.splits)})")
    version = bootstrap_version(dm.content_hash, cfg)
    if artifacts.check_target(out, version, read_teacher_manifest):
        return read_teacher_manifest(out)
    ncfg = net_config(cfg, dm.image_shape, dm.num_classes)
    device = resolve_device(cfg.device)
    args = (ds, dataset_url, cfg, out, version, ncfg, device, progress, on_log, stop_after, on_resume)
    if artifacts.is_local(out):
        return _train_in(artifacts.local_path(artifacts.begin(out)), None, *args)
    mirror = RunMirror(out, run_files=("run.json", checkpoints.METRICS_FILE))
    with tempfile.TemporaryDirectory(prefix="kdm-teacher-") as tmp:
        work = Path(tmp)
        mirror.pull(work)
        return _train_in(work, mirror, *args)


def _train_in(work: Path, mirror: Optional[RunMirror], ds, dataset_url: str, cfg: EDMTeacherTrainConfig, out: str,
              version: str, ncfg: EDMNetConfig, device: torch.device, progress: bool,
              on_log: Optional[Callable[[dict], None]], stop_after: Optional[int],
              on_resume: Optional[Callable[[int], None]]) -> Optional[TeacherManifest]:
    """Train in the local work directory ``work`` (``<out>.partial`` itself, or the local copy of a remote
    run that ``mirror`` pushes checkpoints to and commits)."""
    dm = ds.manifest
    checkpoints.claim_run(work / "run.json", version,
                          {"dataset": dataset_url, "dataset_version": dm.version, "dataset_content_hash": dm.content_hash,
                           "network": ncfg.model_dump(mode="json"), "config": cfg.model_dump(mode="json")},
                          holds=f"{artifacts.partial_url(out)} holds an unfinished teacher run of another config or "
                                f"dataset",
                          hint="delete it or choose another --out")

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(cfg.seed)
    net = build_edm_network(ncfg).to(device).train().requires_grad_(True)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    loss_fn = LOSSES[cfg.precond](P_mean=cfg.P_mean, P_std=cfg.P_std, sigma_data=cfg.sigma_data) \
        if cfg.precond == "edm" else LOSSES[cfg.precond]()
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps, fused=cuda)
    step = 0
    ck = checkpoints.latest_checkpoint(work)
    if ck is not None:
        checkpoints.load_modules(ck, {"net": net, "ema": ema}, device)
        opt.load_state_dict(checkpoints.load_object(ck, "optimizer", map_location=device))
        step = checkpoints.read_state(ck)["step"]
        if on_resume is not None:
            on_resume(step)
    metrics_path = work / checkpoints.METRICS_FILE

    images_np, labels_np = ds.load("train")
    images = torch.from_numpy(images_np).to(device)
    labels = torch.from_numpy(labels_np.astype(np.int64)).to(device)
    eye = torch.eye(ncfg.label_dim, device=device) if ncfg.label_dim else None
    order = _EpochIndex(len(images), cfg.seed, device)
    B = cfg.batch_size
    params, ema_params = list(net.parameters()), list(ema.parameters())
    fwd = torch.compile(net) if (cfg.compile and cuda) else net
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (cuda and cfg.precision == "bf16") else None

    t_start = time.time()
    last_loss, loss_acc, loss_n = None, 0.0, 0
    bar = tqdm(total=cfg.steps, initial=step, desc="teacher", unit="step", disable=not progress, mininterval=2.0)
    # Per log interval: images/s (wall), the steady-state rate (first interval of a session, with cuDNN's
    # autotuning and any compilation, and checkpoint writes left out), host CPU time per step, GPU clocks,
    # temperature, power and the processes on the GPU (pipeline.training.monitor): what a run that slows
    # down needs to show why.
    from pipeline.training.monitor import interval_probes
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else None
    session_steps = 0
    steady = False
    with checkpoints.MetricsLog(metrics_path, step, B, rate_name="images_per_s", probes=interval_probes(device)) as log:
        while step < cfg.steps:
            if stop_after is not None and step >= stop_after:
                bar.close()
                return None
            seed = _step_seed(cfg.seed, step)
            torch.manual_seed(seed)                       # dropout
            gen = torch.Generator(device).manual_seed(seed)
            idx = order.take(step * B, (step + 1) * B)
            x = images[idx].to(torch.float32) / 127.5 - 1
            if cfg.xflip:
                flip = torch.rand(B, device=device, generator=gen) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(3), x)
            y = eye[labels[idx]] if eye is not None else None
            images_seen = step * B
            for g in opt.param_groups:                    # EDM: ramp on the images seen before this step
                g["lr"] = cfg.lr * min(images_seen / max(cfg.lr_rampup_images, 1e-8), 1)
            if autocast is not None:
                with autocast:
                    per_elem = loss_fn(fwd, x, y, generator=gen)
            else:
                per_elem = loss_fn(fwd, x, y, generator=gen)
            loss = per_elem.to(torch.float32).sum() / B
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.sanitize_grads:
                for p in params:
                    if p.grad is not None:
                        torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
            opt.step()
            step += 1
            session_steps += 1
            halflife = cfg.ema_halflife_images
            if cfg.ema_rampup_ratio is not None:        # EDM: on the images seen before this step
                halflife = min(halflife, images_seen * cfg.ema_rampup_ratio)
            beta = 0.5 ** (B / max(halflife, 1e-8))
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1.0 - beta)
            loss_acc += loss.detach()
            loss_n += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                last_loss = float(loss_acc) / loss_n
                loss_acc, loss_n = 0.0, 0
                if not math.isfinite(last_loss):
                    raise KDMError(f"teacher training diverged at step {step} (loss {last_loss}); lower lr "
                                   f"(now {cfg.lr}) or resume from an earlier checkpoint")
                rec = log.record(step, {"loss": last_loss, "lr": opt.param_groups[0]["lr"], "ema_beta": beta},
                                 steady=steady)
                steady = session_steps >= (2 if fwd is not net else 1)
                with log.exclude():
                    log.write(rec)
                    bar.set_postfix(loss=f"{last_loss:.4f}",
                                    img_s=f"{rec['train_images_per_s'] or rec['images_per_s']:.0f}")
                    if on_log is not None:
                        on_log(rec)
            bar.update(1)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                with log.exclude(sync):
                    ck = checkpoints.save_checkpoint(work, step, cfg.keep_checkpoints,
                                                     modules={"net": net, "ema": ema},
                                                     objects={"optimizer": opt.state_dict()})
                    if mirror is not None:
                        mirror.push_checkpoint(work, ck, cfg.keep_checkpoints)
    bar.close()
    if last_loss is None:
        recs = checkpoints.read_metrics(metrics_path)
        last_loss = recs[-1]["loss"] if recs else None
    return _finish(work, out, version, ncfg, cfg, ema, dm, dataset_url, last_loss, time.time() - t_start, device,
                   mirror)


def _finish(work: Path, out: str, version: str, ncfg: EDMNetConfig, cfg: EDMTeacherTrainConfig, ema, dm,
            dataset_url: str, final_loss, seconds: float, device,
            mirror: Optional[RunMirror] = None) -> TeacherManifest:
    checkpoints.save_weights(ema, work / "weights.safetensors")
    artifacts.write_json(str(work / "config.json"), ncfg)
    if cfg.preview_samples:
        from pipeline.evaluation.image_metrics import save_grid
        save_grid(preview_samples(ema, cfg.preview_samples, device), work / PREVIEW,
                  nrow=math.ceil(math.sqrt(cfg.preview_samples)))
    shutil.rmtree(work / checkpoints.CKPT_DIR, ignore_errors=True)
    manifest = TeacherManifest(
        id=version, version_inputs=bootstrap_version_inputs(dm.content_hash, cfg), kind="edm", model=ncfg,
        weights_sha256=artifacts.sha256_file(str(work / "weights.safetensors")),
        dataset=DatasetRef(version=dm.version, content_hash=dm.content_hash, uri=str(dataset_url), split="train"),
        origin=(f"trained by kdm teacher bootstrap (preset {cfg.preset}, {cfg.steps} steps x batch {cfg.batch_size}, "
                f"EMA weights, {seconds:.0f} s in the last session on {device.type})"),
        training=cfg, final_loss=final_loss, code_version=code_version(), created=utc_now())
    artifacts.write_json(str(work / artifacts.MANIFEST), manifest)
    if mirror is None:
        artifacts.commit(out)
    else:
        final = ["weights.safetensors", "config.json", *([PREVIEW] if (work / PREVIEW).exists() else [])]
        mirror.commit(work, final_files=(*final, artifacts.MANIFEST), drop_checkpoints=True)
    return manifest
