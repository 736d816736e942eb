"""KDM for low-dimensional data: x_0 ~= D_psi(C_eta E_varphi(x_T)) (paper Eq. 3, Alg. 1).

Two independent MLP encoders (E_phi for x_0 at t=0, E_varphi for x_T at t=T), one MLP decoder and
a Koopman operator, as the official checkerboard model (858,114 parameters at its default sizes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .koopman import make_operator
from .mlp2d import MLPDecoder, MLPEncoder


@dataclass
class KDMForward:
    z0: torch.Tensor
    zT: torch.Tensor
    z0_noisy: torch.Tensor
    zT_noisy: torch.Tensor
    z_push: torch.Tensor
    x0_rec: torch.Tensor
    x0_push: torch.Tensor | None


class KDM2D(nn.Module):
    def __init__(self, dim: int = 2, hidden: int = 256, latent_dim: int = 256, encoder_layers: int = 5,
                 decoder_layers: int = 5, operator: str = "linear", latent_noise: float = 0.4,
                 time_T: float = 1.0):
        super().__init__()
        self.dim, self.latent_dim, self.latent_noise, self.time_T = dim, latent_dim, latent_noise, time_T
        self.x0_encoder = MLPEncoder(dim, hidden, latent_dim, encoder_layers)
        self.xT_encoder = MLPEncoder(dim, hidden, latent_dim, encoder_layers)
        self.decoder = MLPDecoder(dim, hidden, latent_dim, decoder_layers)
        self.koopman = make_operator(operator, latent_dim)

    @classmethod
    def from_config(cls, cfg) -> "KDM2D":
        return cls(dim=cfg.dim, hidden=cfg.hidden, latent_dim=cfg.latent_dim,
                   encoder_layers=cfg.encoder_layers, decoder_layers=cfg.decoder_layers,
                   operator=cfg.operator, latent_noise=cfg.latent_noise, time_T=cfg.time_T)

    def forward(self, x0: torch.Tensor, xT: torch.Tensor, decode_push: bool = True,
                generator: torch.Generator | None = None) -> KDMForward:
        """Training pass (Alg. 1): noisy latents, Koopman push, decoder on z0_noisy and the push."""
        z0 = self.x0_encoder(x0, 0.0)
        zT = self.xT_encoder(xT, self.time_T)
        eps0 = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
        epsT = torch.randn(zT.shape, generator=generator, device=zT.device, dtype=zT.dtype)
        z0_noisy = z0 + self.latent_noise * eps0
        zT_noisy = zT + self.latent_noise * epsT
        z_push = self.koopman(zT_noisy)
        x0_rec = self.decoder(z0_noisy, 0.0)
        x0_push = self.decoder(z_push, 0.0) if decode_push else None
        return KDMForward(z0, zT, z0_noisy, zT_noisy, z_push, x0_rec, x0_push)

    def generate(self, xT: torch.Tensor) -> torch.Tensor:
        """One-step sampling (Alg. 2): deterministic given x_T."""
        return self.decoder(self.koopman(self.xT_encoder(xT, self.time_T)), 0.0)
