"""KDM for low-dimensional data: x_0 ~= D_psi(C_eta E_varphi(x_T)) (paper Eq. 3, Alg. 1).

Two independent MLP encoders (E_phi for x_0 at t=0, E_varphi for x_T at t=T), one MLP decoder and
a Koopman operator, as the official checkerboard model (858,114 parameters at its default sizes).

A student trained on stored teacher trajectories (``intervals`` = n > 1 grid intervals, ``nfe_train``)
samples with each NFE it was trained for (``generate(x_T, nfe)``): ``models.multistep`` describes the grid,
the trajectory networks and segment operators it adds, and the sampler; ``encode_state``, ``decode_state``
and ``advance`` are what it uses of this model. NFE = 1 is the paper's one-step map.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from .koopman import make_operator
from .mlp2d import MLPDecoder, MLPEncoder
from .multistep import decoder_of, encoder_of, rollout, segment_operator, set_trajectory


class KDMForward(NamedTuple):
    """What a KDM training pass returns (2-D and image models). A tuple, so DistributedDataParallel
    finds its tensors when it wraps the model.

    z0, zT: clean latents; z0_noisy, zT_noisy: with the training noise; z_push: the Koopman push of
    zT_noisy (plus the control term of a conditional image model); x0_rec = D(z0_noisy); x0_push = D(z_push)
    (None unless decoded); spectral: the KDM-F spectral penalty (None unless asked for).
    """
    z0: torch.Tensor
    zT: torch.Tensor
    z0_noisy: torch.Tensor
    zT_noisy: torch.Tensor
    z_push: torch.Tensor
    x0_rec: torch.Tensor
    x0_push: Optional[torch.Tensor]
    spectral: Optional[torch.Tensor] = None


def add_latent_noise(z: torch.Tensor, std: float, eps: Optional[torch.Tensor] = None,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """z + std * eps, computed in at least fp32 (a bf16 latent from autocast is widened first).

    ``eps`` ~ N(0, I) of z's shape is drawn from ``generator`` (the default one when None) unless given;
    a trainer passes its own draws to keep its random stream fixed (e.g. for a captured CUDA graph).
    """
    dtype = torch.promote_types(z.dtype, torch.float32)
    if eps is None:
        eps = torch.randn(z.shape, generator=generator, device=z.device, dtype=dtype)
    return z.to(dtype) + std * eps


class KDM2D(nn.Module):
    def __init__(self, dim: int = 2, hidden: int = 256, latent_dim: int = 256, encoder_layers: int = 5,
                 decoder_layers: int = 5, operator: str = "linear", latent_noise: float = 0.4,
                 time_T: float = 1.0, fourier_features: int = 0, fourier_scale: float = 1.0, intervals: int = 1,
                 nfe_train: tuple[int, ...] = (1,), anchor_rho: float = 1.0):
        super().__init__()
        self.dim, self.latent_dim, self.latent_noise, self.time_T = dim, latent_dim, latent_noise, time_T
        self.x0_encoder = MLPEncoder(dim, hidden, latent_dim, encoder_layers, fourier_features, fourier_scale)
        self.xT_encoder = MLPEncoder(dim, hidden, latent_dim, encoder_layers, fourier_features, fourier_scale)
        self.decoder = MLPDecoder(dim, hidden, latent_dim, decoder_layers)
        self.koopman = make_operator(operator, latent_dim)
        set_trajectory(self, intervals, nfe_train, lambda: make_operator(operator, latent_dim),
                       lambda: MLPEncoder(dim, hidden, latent_dim, encoder_layers, fourier_features, fourier_scale),
                       lambda: MLPDecoder(dim, hidden, latent_dim, decoder_layers), anchor_rho)

    @classmethod
    def from_config(cls, cfg, intervals: int = 1) -> "KDM2D":
        """``intervals``: of the trajectory grid the student is trained on (its run manifest's ``snapshots``)."""
        return cls(dim=cfg.dim, hidden=cfg.hidden, latent_dim=cfg.latent_dim,
                   encoder_layers=cfg.encoder_layers, decoder_layers=cfg.decoder_layers,
                   operator=cfg.operator, latent_noise=cfg.latent_noise, time_T=cfg.time_T,
                   fourier_features=cfg.fourier_features, fourier_scale=cfg.fourier_scale, intervals=intervals,
                   nfe_train=tuple(cfg.nfe_train or (1,)), anchor_rho=cfg.anchor_rho or 1.0)

    def forward(self, x0: torch.Tensor, xT: torch.Tensor, decode_push: bool = True,
                generator: torch.Generator | None = None, *, eps0: torch.Tensor | None = None,
                epsT: torch.Tensor | None = None, spectral: str = "none") -> KDMForward:
        """Training pass (Alg. 1): noisy latents, Koopman push, decoder on z0_noisy and the push.

        The latent noise is ``eps0``/``epsT`` when given, else drawn from ``generator`` (eps0 first).
        ``decode_push=False`` skips D(z_push) (x0_push None); ``spectral`` names the KDM-F penalty
        returned in ``spectral`` ('none': None).
        """
        z0 = self.x0_encoder(x0, 0.0)
        zT = self.xT_encoder(xT, self.time_T)
        z0_noisy = add_latent_noise(z0, self.latent_noise, eps0, generator)
        zT_noisy = add_latent_noise(zT, self.latent_noise, epsT, generator)
        z_push = self.koopman(zT_noisy)
        x0_rec = self.decoder(z0_noisy, 0.0)
        x0_push = self.decoder(z_push, 0.0) if decode_push else None
        spec = self.koopman.spectral_loss(spectral) if spectral != "none" else None
        return KDMForward(z0, zT, z0_noisy, zT_noisy, z_push, x0_rec, x0_push, spec)

    def generate(self, xT: torch.Tensor, nfe: int = 1) -> torch.Tensor:
        """Sampling, deterministic given x_T: NFE = 1 is Alg. 2, D_psi(C_eta E_varphi(x_T, T), 0); a multi-step
        student samples with any NFE it was trained for (``models.multistep.rollout``)."""
        if nfe == 1:
            return self.decoder(self.koopman(self.xT_encoder(xT, self.time_T)), 0.0)
        return rollout(self, xT, nfe)

    # -- the pieces models.multistep uses -------------------------------------------------------------
    def encode_state(self, x: torch.Tensor, tau: torch.Tensor, labels=None, *, net: str) -> torch.Tensor:
        """E_varphi(x_T, T), E_phi(x_0, 0), or the trajectory encoder's E_traj(s, tau) between."""
        return encoder_of(self, net)(x, tau)

    def decode_state(self, z: torch.Tensor, tau: torch.Tensor, labels=None, *, net: str) -> torch.Tensor:
        """D_psi(z, 0) at x_0, the trajectory decoder D_traj(z, tau) between."""
        return decoder_of(self, net)(z, tau)

    def advance(self, z: torch.Tensor, i: int, j: int, labels=None) -> torch.Tensor:
        return segment_operator(self, i, j)(z)
