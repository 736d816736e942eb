"""Training engine for image KDM students (``models.kdm_image.KDMImage``) on a pair store.

One training step keeps the official recipe and order (notes Sec. 4.2-4.4):

1. forward: the model's training pass (``KDMImage.forward``, the only copy of Alg. 1), with latent noise
   drawn here from the engine's own generator: z0 = E_phi(x0), zT = E_varphi(xT), Gaussian noise of std
   ``latent_noise`` on both, push of the noisy zT; the decoder runs once on the concatenation
   [z0_noisy; z_push] (the official code runs it twice; the decoder has no batch-coupled layers, so this
   is the same function); the KDM-F spectral penalty outside autocast;
2. discriminator: BCE(D(x0), 1) + BCE(D(x_push.detach()), 0), real and fake in separate passes
   (separate BatchNorm statistics), then its own Adam step;
3. generator: L_rec + L_lat + L_pred + w_adv * BCE(D_updated(x_push), 1) (+ KDM-F spectral loss), with
   w_adv = adv_weight throughout (official) or scheduled by ``adv_start`` / ``adv_rampup`` (off, then a
   linear ramp; D trains from the first step either way),
   L_lat = MSE(z_push, clean z0), d(.,.) of L_rec/L_pred from ``models.distances``; Adam step;
4. EMA of the generator parameters (multi-tensor lerp), every step.

Speed: bf16 autocast over fp32 master weights (``precision``), TF32, channels_last, fused Adam,
``torch.compile`` of the three U-Nets (``compile``), batches read by
``pipeline.training.image_data`` in background threads and copied to the GPU from pinned memory. ``cuda_graphs``
(by default on one GPU in one process without compile): after 3 eager warm-up steps the whole step
(forward, backward, both Adam steps, EMA, metric sums) is captured once as a CUDA graph and replayed, so
the host launches one graph instead of ~13,000 kernels per step; with ``channels_last=False`` this is the
fastest configuration measured (BENCHMARKS.md: 4.4-4.5x the official step on an H200).

Non-finite guard: a step whose discriminator or generator losses are not finite is skipped (no update
of D, G or the EMA), counted, and reported as ``nonfinite_steps`` in the metrics. The check runs before
the D update (D loss and the generator's reconstruction terms) and after the generator backward (full
generator loss); a failure at the second check skips the generator update and the EMA only. A finite
loss with non-finite gradients is handled as the official code does when ``sanitize_grads`` (NaN -> 0,
+-inf -> +-1e5, then the step), and skipped otherwise. The checks are device flags (agreed across ranks
by an all-reduce): a failed check skips the Adam steps through fused Adam's ``found_inf``, gates the EMA
and the metric sums, restores D's BatchNorm statistics and counts the step on the device; the only host
sync is ``train_step``'s return value (none with ``cuda_graphs``; the count is read when metrics are logged).

Multi-step students (``model.nfe_train``, a pair store with trajectory snapshots): batches also carry the
snapshots (x_t), brought to unit scale (EDM's c_in(sigma), ``models.multistep.snapshot_scales``), and the
step's generator terms come from ``models.multistep.trajectory_forward`` (the one-step terms as above, plus
the trajectory terms: MSE of the latent pushes and of the reconstructions at the anchors);
they train in one process (no torchrun), eagerly by default or, with ``cuda_graphs=True``, as one CUDA graph like
the one-step step (its GPU check is pending), with the trajectory terms' latent noise from a generator of their
own. Both noises are drawn before the step, x_0's and x_T's as the one-step student's (same stream, same order),
so a multi-step student's one-step networks train as the one-step student's.

Processes: one code path for 1 or N GPUs. Under ``torchrun`` (WORLD_SIZE > 1) each process takes
``batch_size / N`` pairs of every step (rank r takes every N-th batch of the shared sample order), the
generator and discriminator are wrapped in DistributedDataParallel (SyncBatchNorm on GPUs), the finite
checks agree across ranks, and only rank 0 writes. DDP wraps the model itself (its ``forward`` is the
training pass) and the discriminator pair.

Run directory (``out``; the layout and resume semantics of ``pipeline.training.train2d``, via ``pipeline.storage.checkpoints``):
  config.json                        run config and pair store (written first)
  metrics.jsonl                      one JSON line per logged step (interval means of the losses; pairs/s
                                     wall-clock and in steady state, host CPU and GPU readings:
                                     pipeline.storage.checkpoints.MetricsLog, pipeline.training.monitor)
  checkpoints/step-NNNNNNNN/         model, ema, disc (safetensors), optimizer.pt, disc_optimizer.pt,
                                     rng.pt (every rank's RNG states), state.json (step, data cursor,
                                     nonfinite_steps); written under a temporary name and renamed
  student.safetensors, manifest.json the EMA weights (not the raw ones) and the manifest, written last
A killed run restarted with the same command resumes from its newest checkpoint; on the CPU in fp32 it
ends bitwise equal to an uninterrupted run (same thread count). At a remote URL (``s3://...``) the run
trains in a local temporary directory (under ``TMPDIR``, made by rank 0 and shared by the processes of
one host) mirrored to ``<url>.partial`` (pipeline.storage.run_mirror): every checkpoint is pushed as it is
written, a restarted run resumes from the newest complete one stored there, and the finished run is
committed to ``<url>`` with its manifest last.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models.discriminator import Discriminator, discriminator_loss, generator_adversarial_loss
from models.distances import DistanceUnavailable, make_distance
from models.kdm_image import KDMImage
from models.multistep import snapshot_scales, trained_indices, trajectory_noise_shape
from storage_schemas import code_version, stable_hash, utc_now
from storage_schemas.kdm_image import (ImageStudentManifest,
                                       ImageTrainConfig, KDMImageConfig, distance_label)
from storage_schemas.multistep import trains_trajectory
from storage_schemas.perceptual import PerceptualNetRef

from pipeline.storage import artifacts
from pipeline.storage import checkpoints
from pipeline.devices import resolve_device
from pipeline.errors import KDMError
from pipeline.storage.run_mirror import RunMirror
from pipeline.training.versions import image_run_version, image_run_version_inputs  # noqa: F401 (re-exported)

SANITIZE_INF = 1e5          # official nan_to_num bounds for +-inf gradients


# -- processes and devices ------------------------------------------------------------------------

@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> tuple[torch.device, DistInfo, bool]:
    """Resolve the device and, under torchrun (WORLD_SIZE > 1), join the process group.

    Returns (device, DistInfo, whether this call created the process group). A requested GPU that is
    absent is an error (``resolve_device``), never a CPU fallback.
    """
    dev = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return dev, DistInfo(), False
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        if local >= torch.cuda.device_count():
            raise KDMError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs are visible")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    created = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        created = True
    return dev, DistInfo(rank, world, local), created


def set_tf32(enabled: bool) -> None:
    """TF32 for fp32 matmuls and cuDNN convolutions (on) or IEEE fp32 (off)."""
    prec = "tf32" if enabled else "ieee"
    try:
        torch.backends.cuda.matmul.fp32_precision = prec
        torch.backends.cudnn.conv.fp32_precision = prec
    except AttributeError:   # torch without the fp32_precision API
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def _derived_seed(*parts) -> int:
    return int(stable_hash(*parts, length=15), 16)


# -- modules run under DDP ------------------------------------------------------------------------

class DiscPair(nn.Module):
    """D on real and fake images in two passes (separate BatchNorm batches, as the official code)."""

    def __init__(self, disc: nn.Module):
        super().__init__()
        self.disc = disc

    def forward(self, real: torch.Tensor, fake: torch.Tensor):
        return self.disc(real), self.disc(fake)


# -- the engine -----------------------------------------------------------------------------------

class ImageTrainer:
    """Model, EMA, discriminator, optimizers, RNG streams and the training step of one process."""

    def __init__(self, model_cfg: KDMImageConfig, train_cfg: ImageTrainConfig, device: torch.device,
                 dist_info: Optional[DistInfo] = None, vgg16_weights: Optional[str] = None,
                 perceptual: Optional[nn.Module] = None, intervals: int = 1,
                 snapshot_scales: Optional[list[float]] = None):
        """``perceptual``: for distance 'lpips-own', a network (``OwnLPIPS`` or ``PerceptualConvNet``) used
        instead of loading ``train_cfg.perceptual_net`` (benchmarks: the step's cost does not depend on its
        weights); the run then records no network reference. ``intervals``: of the trajectory grid a multi-step
        student trains on (its pair store's snapshots + 1); ``snapshot_scales``: the factors that bring its
        snapshots to unit scale (``models.multistep.snapshot_scales``; default 1)."""
        tc = train_cfg
        self.model_cfg, self.cfg, self.device = model_cfg, tc, device
        self.dist = dist_info or DistInfo()
        self.multi = model_cfg.nfe_train is not None and intervals > 1      # trained on trajectory snapshots
        self.snapshot_scales = list(snapshot_scales or [1.0] * (intervals - 1))
        self.inner: list[int] = []          # the grid indices between x_T and x_0 a multi-step batch needs
        if self.multi and self.dist.enabled:
            raise KDMError("a multi-step student (model.nfe_train) trains in one process: run it without torchrun")
        self.amp = tc.precision == "bf16"
        self.cuda = device.type == "cuda"
        self.channels_last = tc.channels_last
        if self.cuda:
            set_tf32(tc.tf32)
            torch.backends.cudnn.benchmark = True      # fixed shapes: pick the fastest convolution kernels
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format

        torch.manual_seed(tc.seed)                     # the same initial weights on every rank
        self.model = KDMImage.from_config(model_cfg, intervals).to(device=device, memory_format=fmt)
        self.disc = (Discriminator(model_cfg.channels).to(device=device, memory_format=fmt)
                     if model_cfg.adv_weight > 0 else None)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        if self.multi:
            self.inner = trained_indices(self.model)[1:-1]
        self.distance_net: Optional[PerceptualNetRef] = None
        own = None
        if model_cfg.distance == "lpips-own" and perceptual is not None:
            from models.perceptual import OwnLPIPS
            own = perceptual if isinstance(perceptual, OwnLPIPS) else OwnLPIPS(perceptual)
        elif model_cfg.distance == "lpips-own":
            from pipeline.training.perceptual import load_perceptual_distance
            own = load_perceptual_distance(tc.perceptual_net, device)
            self.distance_net = PerceptualNetRef(id=own.net_id, sha256=own.sha256)
        try:
            dist_fn = make_distance(model_cfg.distance, model_cfg.pseudo_huber_c,
                                    vgg16_weights or tc.vgg16_weights, perceptual_net=own)
        except DistanceUnavailable as e:
            raise KDMError(str(e)) from None
        if isinstance(dist_fn, nn.Module):
            dist_fn = dist_fn.to(device) if own is None else dist_fn.to(device=device, memory_format=fmt)
        self.distance = dist_fn
        self.distance_name = distance_label(model_cfg, self.distance_net)

        # Per-rank random streams: latent noise (own generator), dropout (the default generators).
        self.noise_gen = torch.Generator(device=device).manual_seed(_derived_seed(tc.seed, "noise", self.dist.rank))
        self.traj_gen = torch.Generator(device=device).manual_seed(_derived_seed(tc.seed, "trajectory", 0))
        torch.manual_seed(_derived_seed(tc.seed, "dropout", self.dist.rank))

        self.forward_module: nn.Module = self.model          # the training pass; DDP-wrapped below
        self.disc_pair: Optional[nn.Module] = DiscPair(self.disc) if self.disc else None
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [device.index] if self.cuda else None
            self.forward_module = DDP(self.forward_module, device_ids=ids)
            if self.disc is not None:
                # BatchNorm over the global batch on GPUs (SyncBatchNorm is CUDA-only; on the CPU each
                # rank normalises its own batch and DDP broadcasts rank 0's running statistics).
                pair = nn.SyncBatchNorm.convert_sync_batchnorm(self.disc_pair) if self.cuda else self.disc_pair
                self.disc_pair = DDP(pair, device_ids=ids)
                self.disc = self.disc_pair.module.disc
        if tc.compile:
            # Each U-Net compiled in place (state_dict keys unchanged); the two encoders share one graph.
            for unet in (self.model.x0_encoder.unet, self.model.xT_encoder.unet, self.model.decoder.unet):
                unet.compile()

        graphs_possible = self.cuda and not self.dist.enabled
        if tc.cuda_graphs and not graphs_possible:
            raise KDMError("cuda_graphs=True needs one CUDA device and one process (no torchrun); got device "
                           f"{device}, {self.dist.world_size} process(es)")
        # The whole step as one CUDA graph: asked for, or by default wherever it is possible. With compile,
        # only when asked (cuda_graphs=True): the compiled U-Nets (inductor's default mode, no graphs of its
        # own) run eagerly in the warm-up steps, where they compile, and are captured with the rest. A multi-step
        # student's captured step is opt-in too (cuda_graphs=True) until a GPU run has checked it against the
        # eager step (tests/test_image_engine.py, the GPU test of both): by default it trains eagerly.
        self.cuda_graphs = (graphs_possible and not tc.compile and not self.multi) if tc.cuda_graphs is None \
            else tc.cuda_graphs
        if self.cuda_graphs and (model_cfg.trajectory_every or 1) > 1:
            raise KDMError(f"model.trajectory_every = {model_cfg.trajectory_every} alternates two kinds of step, "
                           f"which train eagerly: leave train.cuda_graphs unset (or false), or trajectory_every unset")
        # Fused Adam (CPU and CUDA): the non-finite guard skips its steps on the device through found_inf.
        opt_kw = dict(betas=tuple(tc.betas), eps=tc.adam_eps, weight_decay=tc.weight_decay, fused=True,
                      capturable=self.cuda_graphs)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.ema_params = [p for p, q in zip(self.ema.parameters(), self.model.parameters()) if q.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=tc.lr, **opt_kw)
        self.d_opt = torch.optim.Adam(self.disc.parameters(), lr=tc.disc_lr, **opt_kw) if self.disc else None
        self.model.train()
        if self.disc is not None:
            self.disc.train()

        # BatchNorm statistics of D, restored when a non-finite batch is skipped (its forward updated them).
        self._bn_bufs = list(self.disc.buffers()) if self.disc is not None else []
        self._bn_backup = [b.clone() for b in self._bn_bufs]

        # Metric sums, step counters and guard flags live on the device (updated in place, so a captured
        # CUDA graph keeps adding into them); ``pop_metrics`` and ``nonfinite_steps`` read them.
        self._nonfinite = 0
        self._sums: dict[str, torch.Tensor] = {}
        self._count = torch.zeros((), device=device)              # finite steps since pop_metrics
        self._skipped = torch.zeros((), device=device)            # skipped steps not yet in _nonfinite
        self._d_found_inf = torch.zeros((), device=device)
        self._g_found_inf = torch.zeros((), device=device)
        # The generator's adversarial weight of the current step (model_cfg.adv_weight_at), a device scalar
        # written before each step so that a captured graph reads the scheduled value.
        self._adv_w_value = float(model_cfg.adv_weight_at(0, tc.steps))
        self._adv_w = torch.full((), self._adv_w_value, device=device)
        self._graph: Optional[torch.cuda.CUDAGraph] = None        # cuda_graphs: the captured step
        self._static: Optional[tuple] = None                      # ... and its input buffers
        self._warm_steps = 0
        self.steps_run = 0                                        # train_step calls of this trainer
        self._trajectory_now = self.multi                         # set_step: this step trains the trajectory terms

    @property
    def steady(self) -> bool:
        """Whether the next step runs as every later one will: the CUDA graph is captured (``cuda_graphs``),
        or, eagerly, the first step (cuDNN autotuning, compilation) is done. Throughput logs count only
        intervals that start steady."""
        if self.cuda_graphs:
            return self._graph is not None
        return self.steps_run >= (2 if self.cfg.compile else 1)

    @property
    def nonfinite_steps(self) -> int:
        """Steps skipped by the non-finite guard (reads the device counter: one host sync)."""
        self._nonfinite += int(self._skipped.item())
        self._skipped.zero_()
        return self._nonfinite

    @nonfinite_steps.setter
    def nonfinite_steps(self, n: int) -> None:
        self._skipped.zero_()
        self._nonfinite = int(n)

    # -- one step -----------------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp else nullcontext()

    def _prepare(self, x_T, x_0, label):
        kw = dict(device=self.device, non_blocking=True)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        x0 = x_0.to(**kw).contiguous(memory_format=fmt)
        xT = x_T.to(**kw).contiguous(memory_format=fmt)
        y = None
        if self.model_cfg.label_dim:
            if label is None:
                raise KDMError("a conditional model (label_dim > 0) needs labels")
            y = F.one_hot(label.to(**kw).long(), self.model_cfg.label_dim).float()
        return x0, xT, y

    def set_step(self, step: int) -> None:
        """Schedule of the step about to run (0-based): the adversarial weight (``adv_start``/``adv_rampup``), and
        whether a multi-step student's trajectory terms train in it (``trajectory_every``)."""
        self._trajectory_now = self.multi and trains_trajectory(self.model_cfg.trajectory_every, step)
        if self.disc is None:
            return
        w = float(self.model_cfg.adv_weight_at(step, self.cfg.steps))
        if w != self._adv_w_value:          # a device write only when the value changes
            self._adv_w.fill_(w)
            self._adv_w_value = w

    def train_step(self, x_T: torch.Tensor, x_0: torch.Tensor, label: Optional[torch.Tensor] = None,
                   x_t: Optional[torch.Tensor] = None) -> bool:
        """One optimisation step on a batch (``x_t``: its trajectory snapshots, multi-step students; not read in the
        steps ``trajectory_every`` leaves to the one-step terms); returns
        False when the non-finite guard skipped it (one host sync). With ``cuda_graphs`` it returns True without
        a sync: skips show in ``nonfinite_steps``."""
        x0, xT, y = self._prepare(x_T, x_0, label)
        self.steps_run += 1
        states = None
        if self._trajectory_now:
            if x_t is None:
                raise KDMError("a multi-step student's batches carry the trajectory snapshots (x_t)")
            fmt = torch.channels_last if self.channels_last else torch.contiguous_format
            xt = x_t.to(device=self.device, non_blocking=True)
            states = {0: xT, self.model.intervals: x0}
            for i in self.inner:                         # at unit scale, as the trajectory networks work
                states[i] = (xt[:, i - 1] * self.snapshot_scales[i - 1]).contiguous(memory_format=fmt)
        if self.cuda_graphs:
            return self._graph_step(x0, xT, y, states)
        return bool(self._step(x0, xT, y, *self._noise(x0.shape[0], trajectory=states is not None), states=states))

    def _noise(self, batch: int, out: Optional[tuple] = None,
               trajectory: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The step's latent noise, drawn before it: x_0's and x_T's (2, B, latent_dim) from the noise stream, a
        multi-step student's trajectory terms' (``models.multistep.trajectory_noise_shape``; ``trajectory``: the
        step trains them) from their own stream; into the tensors ``out`` when given (a captured step's static
        buffers)."""
        eps_out, traj_out = out if out is not None else (None, None)
        traj_shape = trajectory_noise_shape(self.model, batch, self.model_cfg.trajectory_rows) \
            if self.multi and trajectory else None
        eps = torch.randn((2, batch, self.model.latent_dim), generator=self.noise_gen, device=self.device,
                          out=eps_out)
        traj = None if traj_shape is None else torch.randn(traj_shape, generator=self.traj_gen, device=self.device,
                                                           out=traj_out)
        return eps, traj

    def _agree(self, ok: torch.Tensor) -> torch.Tensor:
        """The guard flag agreed across ranks (all finite on every rank), without a host sync."""
        if not self.dist.enabled:
            return ok
        flag = ok.to(torch.float32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return flag > 0

    def _step(self, x0, xT, y, eps, traj_eps=None, states: Optional[dict] = None) -> torch.Tensor:
        """The step; returns the guard flag (a device bool). The finite checks are device flags: a failed
        check skips the Adam steps (fused Adam's found_inf) and the EMA, keeps the metric sums, restores D's
        BatchNorm statistics and counts the step as skipped, all without a host sync (so the step can be
        captured as a CUDA graph). ``states``: the grid states of a multi-step student's batch, ``traj_eps`` the
        noise of its trajectory terms."""
        mc = self.model_cfg
        extra = {}
        with self._autocast():
            if states is None:
                out = self.forward_module(x0, xT, y, eps0=eps[0], epsT=eps[1], spectral=mc.spectral_loss)
            else:
                from models.multistep import trajectory_forward, trajectory_terms
                traj = trajectory_forward(self.model, states, y, spectral=mc.spectral_loss,
                                          aux_rows=mc.trajectory_rows, output=bool(mc.trajectory_output),
                                          eps=eps, traj_eps=traj_eps)
                out = traj.one_step
                # MSE at unit scale (the anchors' states are noisy images), the sampler's outputs included
                extra = trajectory_terms(traj)
            x_push, spectral = out.x0_push, out.spectral
            if hasattr(self.distance, "against"):       # lpips-own: x0's features computed once
                rec, pred = (d.mean() for d in self.distance.against(x0, out.x0_rec, x_push))
            else:
                rec = self.distance(out.x0_rec, x0).mean()
                pred = self.distance(x_push, x0).mean()
        lat = F.mse_loss(out.z_push.float(), out.z0.float())
        if "traj_rec" in extra:
            rec, lat = rec + extra["traj_rec"], lat + extra["traj_lat"]
        terms = {"rec": rec, "lat": lat, "pred": pred, **extra}
        if spectral is not None:
            terms["spectral"] = spectral
        total = rec + lat + pred + (spectral if spectral is not None else 0.0) + extra.get("traj_out", 0.0)
        ok = torch.isfinite(total.detach())
        if self.disc is not None:
            # Check 1, before D's update: D loss and the generator's terms so far.
            torch._foreach_copy_(self._bn_backup, self._bn_bufs)
            with self._autocast():
                d_real, d_fake = self.disc_pair(x0, x_push.detach())
            d_loss = discriminator_loss(d_real.float(), d_fake.float())
            ok = ok_d = self._agree(ok & torch.isfinite(d_loss.detach()))
            self.d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            self._d_found_inf.copy_(~ok_d)
            self.d_opt.found_inf = self._d_found_inf
            self.d_opt.step()
            self.disc.requires_grad_(False)          # generator pass: gradients flow to x_push only
            with self._autocast():
                adv = generator_adversarial_loss(self.disc(x_push).float())
            self.disc.requires_grad_(True)
            total = total + self._adv_w * adv
            terms.update(disc=d_loss.detach(), adv=adv, adv_weight=self._adv_w.clone())

        self.opt.zero_grad(set_to_none=True)
        total.backward()
        if self.disc is not None:   # a step skipped at check 1 leaves no trace in D's statistics
            for buf, backup in zip(self._bn_bufs, self._bn_backup):
                buf.copy_(torch.where(ok_d, buf, backup))
        # Check 2, after the generator's backward: the full loss, and the gradients unless sanitised.
        grads = [p.grad for p in self.params if p.grad is not None]
        gnorm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        grads_ok = torch.isfinite(gnorm)
        ok = ok & torch.isfinite(total.detach())
        if self.cfg.sanitize_grads:         # NaN -> 0, +-inf -> +-1e5 (a no-op on finite gradients)
            for g in grads:
                torch.nan_to_num_(g, nan=0.0, posinf=SANITIZE_INF, neginf=-SANITIZE_INF)
            gnorm = torch.where(grads_ok, gnorm, torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
        else:
            ok = ok & grads_ok
        ok = self._agree(ok)
        if self.cfg.grad_clip is not None:
            torch._foreach_mul_(grads, torch.clamp(self.cfg.grad_clip / (gnorm + 1e-6), max=1.0))
        self._g_found_inf.copy_(~ok)
        self.opt.found_inf = self._g_found_inf
        self.opt.step()
        okf = ok.to(torch.float32)
        self.ema_update(weight=okf * (1.0 - self.cfg.ema_decay))
        terms.update(total=total, grad_norm=gnorm)
        for k, v in terms.items():     # (sum, finite steps) per term: some terms train in some steps only
            if k not in self._sums:
                self._sums[k] = torch.zeros(2, device=self.device)
            self._sums[k].add_(torch.stack((torch.where(ok, v.detach().float(), 0.0), okf)))
        self._count.add_(okf)
        self._skipped.add_(1.0 - okf)
        return ok

    # -- cuda_graphs: the step captured once, replayed -------------------------------------------------
    GRAPH_WARMUP_STEPS = 3

    def _graph_step(self, x0, xT, y, states: Optional[dict] = None) -> bool:
        """``_step`` on static input buffers: run eagerly on a side stream for the first GRAPH_WARMUP_STEPS
        steps (cuDNN autotuning, optimizer state), then captured once and replayed. A batch of another
        shape (a short last batch) runs eagerly. ``states``: a multi-step student's grid states (its x_T and
        x_0 are ``xT`` and ``x0``)."""
        n = self.model.intervals
        if self._static is not None and self._static[0].shape != x0.shape:
            self._step(x0, xT, y, *self._noise(x0.shape[0]), states=states)
            return True
        fresh = self._static is None
        if fresh:                       # the first step's inputs and noise become the static buffers
            self._static = (x0.clone(), xT.clone(), None if y is None else y.clone(), *self._noise(x0.shape[0]),
                            None if states is None else {i: states[i].clone() for i in self.inner})
        s_x0, s_xT, s_y, s_eps, s_traj, s_inner = self._static
        if not fresh:
            s_x0.copy_(x0)
            s_xT.copy_(xT)
            if s_y is not None:
                s_y.copy_(y)
            for i, buf in (s_inner or {}).items():
                buf.copy_(states[i])
            self._noise(x0.shape[0], out=(s_eps, s_traj))
        s_states = None if s_inner is None else {0: s_xT, n: s_x0, **s_inner}
        args = (s_x0, s_xT, s_y, s_eps, s_traj)
        if self._graph is None and self._warm_steps < self.GRAPH_WARMUP_STEPS:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._step(*args, states=s_states)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self._warm_steps += 1
            return True
        if self._graph is None:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):       # records only: the step runs at the replay below
                self._step(*args, states=s_states)
            self._graph = graph
        self._graph.replay()
        return True

    @torch.no_grad()
    def ema_update(self, weight: torch.Tensor | float | None = None) -> None:
        """ema += weight * (theta - ema); weight defaults to 1 - ema_decay (a device tensor: 0 skips)."""
        w = 1.0 - self.cfg.ema_decay if weight is None else weight
        diff = torch._foreach_sub(self.params, self.ema_params)
        torch._foreach_mul_(diff, w)
        torch._foreach_add_(self.ema_params, diff)

    def pop_metrics(self) -> dict[str, float]:
        """Means of the loss terms over the finite steps since the last call that computed them, and over the
        ranks (one sync; collective under DDP). The sums are zeroed in place (a captured graph keeps adding into
        them)."""
        count = float(self._count.item())
        if not count:           # the same on every rank (the guard flags are agreed)
            return {}
        keys = list(self._sums)
        vals = torch.stack([self._sums[k] for k in keys])
        if self.dist.enabled:
            dist.all_reduce(vals)
        torch._foreach_zero_(list(self._sums.values()))
        self._count.zero_()
        return {k: s / n for k, (s, n) in zip(keys, vals.tolist()) if n}

    # -- state --------------------------------------------------------------------------------------
    def rng_state(self) -> dict[str, torch.Tensor]:
        st = {"torch_cpu": torch.get_rng_state(), "noise": self.noise_gen.get_state()}
        if self.multi:
            st["trajectory"] = self.traj_gen.get_state()
        if self.cuda:
            st["cuda"] = torch.cuda.get_rng_state(self.device)
        return st

    def set_rng_state(self, st: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(st["torch_cpu"])
        self.noise_gen.set_state(st["noise"])
        if "trajectory" in st:
            self.traj_gen.set_state(st["trajectory"])
        if self.cuda and "cuda" in st:
            torch.cuda.set_rng_state(st["cuda"], self.device)

    def save(self, path: Path, step: int, extra: dict) -> None:
        """Write a complete checkpoint into ``path`` (an empty directory). Collective under DDP."""
        rngs = [self.rng_state()]
        if self.dist.enabled:
            gathered = [None] * self.dist.world_size
            dist.all_gather_object(gathered, {k: v.cpu() for k, v in rngs[0].items()})
            rngs = gathered
        if not self.dist.is_main:
            return
        modules, objects = {"model": self.model, "ema": self.ema}, {"optimizer": self.opt.state_dict()}
        if self.disc is not None:
            modules["disc"] = self.disc
            objects["disc_optimizer"] = self.d_opt.state_dict()
        objects["rng"] = {"ranks": rngs}
        state = {"step": step, "nonfinite_steps": self.nonfinite_steps, "world_size": self.dist.world_size, **extra}
        checkpoints.write_checkpoint_files(path, state, modules, objects)

    def load(self, path: Path) -> dict:
        modules, optimizers = {"model": self.model, "ema": self.ema}, {"optimizer": self.opt}
        if self.disc is not None:
            modules["disc"], optimizers["disc_optimizer"] = self.disc, self.d_opt
        state = checkpoints.load_checkpoint(path, self.device, modules, optimizers)
        rngs = checkpoints.load_object(path, "rng")["ranks"]
        if len(rngs) == self.dist.world_size:
            self.set_rng_state(rngs[self.dist.rank])
        else:   # another process count: fresh per-rank streams, derived from the seed and the step
            self.noise_gen.manual_seed(_derived_seed(self.cfg.seed, "noise", self.dist.rank, state["step"]))
            torch.manual_seed(_derived_seed(self.cfg.seed, "dropout", self.dist.rank, state["step"]))
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        if self._graph is not None:     # the optimizers' state tensors were replaced: capture again
            self._graph = None
        return state


# -- runs -----------------------------------------------------------------------------------------

def read_image_student_manifest(url: str) -> ImageStudentManifest:
    return artifacts.read_model(artifacts.join(url, artifacts.MANIFEST), ImageStudentManifest)


def _check_store(store, model_cfg: KDMImageConfig, pairs_url: str) -> None:
    m = store.manifest
    want = (model_cfg.channels, model_cfg.img_resolution, model_cfg.img_resolution)
    if tuple(m.sample_shape) != want:
        raise KDMError(f"pairs {pairs_url} have sample shape {tuple(m.sample_shape)}; the model expects {want} "
                       f"(channels, img_resolution, img_resolution)")
    if abs(m.x_T_scale - model_cfg.noise_scale) > 1e-6 * model_cfg.noise_scale:
        raise KDMError(f"pairs {pairs_url} store x_T = {m.x_T_scale} * eps but the model samples x_T = "
                       f"{model_cfg.noise_scale} * eps; re-import the pairs with x_T scaled by "
                       f"{model_cfg.noise_scale / m.x_T_scale:g} or set model.noise_scale={m.x_T_scale:g}")
    if model_cfg.label_dim and m.num_classes != model_cfg.label_dim:
        raise KDMError(f"the model is conditional on {model_cfg.label_dim} classes but pairs {pairs_url} have "
                       f"num_classes={m.num_classes}")
    nfe = model_cfg.nfe_train
    if nfe and max(nfe) > (m.snapshots.count + 1 if m.snapshots else 1):
        raise KDMError(f"model.nfe_train {list(nfe)} needs a pair store whose trajectories have at least {max(nfe)} "
                       f"intervals; {pairs_url} keeps {m.snapshots.count if m.snapshots else 'no'} trajectory "
                       f"snapshot(s): generate pairs with --snapshots K (K >= {max(nfe) - 1})")


def train_image_student(pairs_url: str, model_cfg: KDMImageConfig, train_cfg: ImageTrainConfig, out: str,
                        device: Optional[str] = None, *, preset: str = "custom", progress: bool = True,
                        on_log: Optional[Callable[[dict], None]] = None, max_steps: Optional[int] = None,
                        vgg16_weights: Optional[str] = None,
                        on_checkpoint: Optional[Callable[[int, torch.nn.Module], None]] = None,
                        on_resume: Optional[Callable[[int], None]] = None) -> str:
    """Train (or resume, or find finished) an image KDM student on the train split of ``pairs_url``.

    ``device`` overrides ``train_cfg.device`` ('cpu', 'cuda' or 'cuda:N'; under torchrun each process
    takes cuda:LOCAL_RANK). ``max_steps`` stops this process after that many steps in total, with a
    checkpoint there, without finishing the run (a later call resumes). ``on_checkpoint(step, ema)`` is
    called on the main process after every checkpoint with the EMA model in eval mode (e.g. to write a
    sample grid of fixed noise, so a run's progress can be looked at); ``on_resume(step)`` when training
    continues from a checkpoint. A remote ``out`` trains in a local temporary directory mirrored to
    ``<out>.partial`` (pipeline.storage.run_mirror). Returns the run version.
    """
    from pipeline.training.image_data import ChunkShuffleSampler, Cursor
    from pipeline.storage.pairstore import PairStore

    if device is not None and device in ("cpu", "cuda"):
        train_cfg = train_cfg.model_copy(update={"device": device})
    dev, di, created_pg = init_distributed(device or train_cfg.device)
    try:
        return _train(pairs_url, model_cfg, train_cfg, out, dev, di, preset, progress, on_log, max_steps,
                      vgg16_weights, PairStore, ChunkShuffleSampler, Cursor, on_checkpoint, on_resume)
    finally:
        if created_pg and dist.is_initialized():
            dist.destroy_process_group()


def _barrier(di: DistInfo) -> None:
    if di.enabled:
        dist.barrier()


def _shared_work_dir(di: DistInfo) -> Path:
    """A fresh local directory made by rank 0, its path broadcast to the other processes (one host)."""
    path = [tempfile.mkdtemp(prefix="kdm-image-student-") if di.is_main else None]
    if di.enabled:
        dist.broadcast_object_list(path, src=0)
    return Path(path[0])


def _train(pairs_url, model_cfg, tc, out, dev, di, preset, progress, on_log, max_steps, vgg16_weights,
           PairStore, ChunkShuffleSampler, Cursor, on_checkpoint=None, on_resume=None) -> str:
    store = PairStore.open(pairs_url)
    _check_store(store, model_cfg, pairs_url)
    m = store.manifest
    version = image_run_version(m.version, model_cfg, tc)
    # a local run directory is written in place (resumed below); a remote one: a cut-off commit is finished
    if (artifacts.committed(out) or not artifacts.is_local(out)) and \
            artifacts.check_target(out, version, read_image_student_manifest):
        return version
    if tc.batch_size % di.world_size:
        raise KDMError(f"train.batch_size {tc.batch_size} is not divisible by the {di.world_size} processes")
    args = (store, version, pairs_url, model_cfg, tc, out, dev, di, preset, progress, on_log, max_steps,
            vgg16_weights, ChunkShuffleSampler, on_checkpoint, on_resume)
    if artifacts.is_local(out):
        return _train_in(artifacts.local_path(out), None, *args)
    mirror = RunMirror(out, run_files=(artifacts.RUN_CONFIG, checkpoints.METRICS_FILE))
    run = _shared_work_dir(di)
    try:
        if di.is_main:
            mirror.pull(run)
        _barrier(di)
        return _train_in(run, mirror, *args)
    finally:
        if di.is_main:
            shutil.rmtree(run)


def _train_in(run: Path, mirror: Optional[RunMirror], store, version, pairs_url, model_cfg, tc, out, dev, di,
              preset, progress, on_log, max_steps, vgg16_weights, ChunkShuffleSampler, on_checkpoint,
              on_resume) -> str:
    """Train in the local run directory ``run`` (``out`` itself, or the local copy of a remote run that
    ``mirror`` pushes checkpoints to and commits when training ends)."""
    m = store.manifest
    if di.is_main:
        run.mkdir(parents=True, exist_ok=True)
        checkpoints.claim_run(run / artifacts.RUN_CONFIG, version,
                              {"pairs": pairs_url, "pairs_version": m.version, "pairs_content_hash": m.content_hash,
                               "preset": preset, "model": model_cfg.model_dump(mode="json"),
                               "train": tc.model_dump(mode="json")},
                              holds=f"{out} holds a run of another config/pairs")
    _barrier(di)
    if tc.threads:
        torch.set_num_threads(tc.threads)

    intervals = m.snapshots.count + 1 if model_cfg.nfe_train and m.snapshots else 1
    scales = snapshot_scales(m.snapshots.axis, m.snapshots.levels) if intervals > 1 else None
    trainer = ImageTrainer(model_cfg, tc, dev, di, vgg16_weights, intervals=intervals, snapshot_scales=scales)
    sampler = ChunkShuffleSampler(store, tc.batch_size // di.world_size, seed=tc.seed, buffer_chunks=tc.buffer_chunks,
                                  rank=di.rank, world_size=di.world_size, pin_memory=dev.type == "cuda",
                                  read_threads=tc.read_threads, snapshots=trainer.multi)
    step = 0
    ck = checkpoints.latest_checkpoint(run)
    if ck is not None:
        state = trainer.load(ck)
        step = int(state["step"])
        sampler.load_state_dict(state["data"])
        if on_resume is not None and di.is_main:
            on_resume(step)
    metrics_path = run / checkpoints.METRICS_FILE
    stop = tc.steps if max_steps is None else min(tc.steps, max_steps)
    from pipeline.training.monitor import interval_probes
    log = checkpoints.MetricsLog(metrics_path, step, tc.batch_size, write=di.is_main,
                                 probes=interval_probes(dev) if di.is_main else ())
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else None
    final: dict[str, float] = {}
    bar = None
    if progress and di.is_main:
        from tqdm import tqdm
        bar = tqdm(total=tc.steps, initial=step, desc="train-image", mininterval=1.0)
    batches = iter(sampler)
    steady = trainer.steady          # whether the current log interval started in steady state
    try:
        while step < stop:
            batch = next(batches)
            trainer.set_step(step)
            trainer.train_step(batch.x_T, batch.x_0, batch.label, batch.x_t)
            step += 1
            if step % tc.log_every == 0 or step == tc.steps:
                losses = trainer.pop_metrics()
                rec = log.record(step, {**{f"loss_{k}": v for k, v in losses.items()
                                           if k not in ("grad_norm", "adv_weight")},
                                        "grad_norm": losses.get("grad_norm"),
                                        **({"adv_weight": losses["adv_weight"]} if "adv_weight" in losses else {}),
                                        "nonfinite_steps": trainer.nonfinite_steps,
                                        "epoch": sampler.cursor.epoch}, steady=steady)
                steady = trainer.steady
                final = {k.removeprefix("loss_"): v for k, v in rec.items() if k.startswith("loss_")}
                if di.is_main:
                    with log.exclude():
                        log.write(rec)
                        if on_log is not None:
                            on_log(rec)
                if bar is not None and "total" in losses:
                    rate = rec.get("train_pairs_per_s") or rec["pairs_per_s"]
                    bar.set_postfix(loss=f"{losses['total']:.4f}", pairs_s=f"{rate:.0f}",
                                    skipped=trainer.nonfinite_steps)
            if bar is not None:
                bar.update(1)
            if step % tc.checkpoint_every == 0 or step == stop:
                with log.exclude(sync):
                    _save_checkpoint(run, step, trainer, sampler.cursor, tc.keep_checkpoints, di, mirror)
                    if on_checkpoint is not None and di.is_main:
                        on_checkpoint(step, trainer.ema)
    finally:
        batches.close()
        sampler.close()
        if bar is not None:
            bar.close()
        log.close()
    if step < tc.steps:        # stopped by max_steps: resumable, not finished
        return version

    if di.is_main:
        if not final:   # resumed from the final checkpoint: the last logged losses are the final ones
            final = checkpoints.last_losses(metrics_path)
        weights = run / "student.safetensors"
        checkpoints.save_weights(trainer.ema, weights)
        manifest = ImageStudentManifest(
            version=version, version_inputs=image_run_version_inputs(m.version, model_cfg, tc), model=model_cfg,
            train=tc, preset=preset, pairs_version=m.version,
            pairs_content_hash=m.content_hash, teacher_id=m.teacher.id if m.teacher else None, steps_done=step,
            nonfinite_steps=trainer.nonfinite_steps, weights_sha256=artifacts.sha256_file(str(weights)),
            trainable_parameters=sum(p.numel() for p in trainer.params),
            discriminator_parameters=sum(p.numel() for p in trainer.disc.parameters()) if trainer.disc else 0,
            distance_name=trainer.distance_name, distance_net=trainer.distance_net,
            world_size=di.world_size, snapshots=m.snapshots if trainer.multi else None,
            final_losses={k: float(v) for k, v in final.items()},
            train_seconds=time.time() - log.t_start, steady_pairs_per_s=_rounded(log.steady_rate),
            code_version=code_version(), created=utc_now())
        artifacts.write_json(str(run / artifacts.MANIFEST), manifest)
        if mirror is not None:
            mirror.commit(run, final_files=(weights.name, artifacts.MANIFEST))
    _barrier(di)
    return version


def _rounded(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(x, 1)


def _save_checkpoint(run: Path, step: int, trainer: ImageTrainer, cursor, keep: int, di: DistInfo,
                     mirror: Optional[RunMirror] = None) -> None:
    tmp = checkpoints.begin_checkpoint(run, step) if di.is_main else checkpoints.pending_path(run, step)
    trainer.save(tmp, step, {"data": {"cursor": cursor.to_dict(), "seed": trainer.cfg.seed,
                                      "buffer_chunks": trainer.cfg.buffer_chunks}})
    if di.is_main:
        ck = checkpoints.commit_checkpoint(run, step, keep)
        if mirror is not None:
            mirror.push_checkpoint(run, ck, keep)
    _barrier(di)


# -- command line (wired into `kdm` by pipeline.cli) ----------------------------------------------
