"""Koopman operators C_eta acting on flattened latents (paper Sec. 4 and App. C).

* ``LinearKoopman``: an affine ``nn.Linear(d, d)`` with bias, PyTorch default init (official code).
* ``FactorizedKoopman`` (KDM-F): C = Re(P Lambda P_inv) restricted to the real half, with
  lambda_j = exp(-exp(nu_j)) * exp(i theta_j), so |lambda_j| < 1 by construction. Same initialisation,
  row normalisation of P and forward order (P Lambda P_inv) as the official ``FastKoopmanMatrix``.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class LinearKoopman(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.linear = nn.Linear(dim, dim, bias=True)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(z)

    def matrix(self) -> torch.Tensor:
        return self.linear.weight

    def spectral_loss(self, kind: str) -> torch.Tensor:
        if kind != "none":
            raise ValueError(f"spectral loss {kind!r} needs the factorized operator")
        return self.linear.weight.new_zeros(())


def _block(re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
    """Real 2d x 2d form [[re, -im], [im, re]] of the complex matrix re + i im."""
    return torch.cat([torch.cat([re, -im], 1), torch.cat([im, re], 1)], 0)


class FactorizedKoopman(nn.Module):
    def __init__(self, dim: int, generator: torch.Generator | None = None):
        super().__init__()
        self.dim = dim
        scale = 1.0 / math.sqrt(2 * dim)
        g = generator

        def ortho() -> torch.Tensor:
            q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
            return q * scale

        self.P_re = nn.Parameter(ortho())
        self.P_im = nn.Parameter(ortho())
        self.P_inv_re = nn.Parameter(torch.randn(dim, dim, generator=g) * scale)
        self.P_inv_im = nn.Parameter(torch.randn(dim, dim, generator=g) * scale)
        # Ring init (LRU, r_min=0, r_max=1): modulus sqrt(u1), phase 2*pi*u2.
        u1 = torch.rand(dim, generator=g).clamp_min(1e-12)
        u2 = torch.rand(dim, generator=g).clamp_min(1e-12)
        self.nu_log = nn.Parameter(torch.log(-0.5 * torch.log(u1)))
        self.theta_log = nn.Parameter(torch.log(2 * math.pi * u2))
        # Fixed eigenvalue targets for the 'unit-disk-uniform' penalty: uniform on the unit disk
        # (the official code draws them on the square [-1, 1]^2, partly outside the reachable disk).
        r = torch.rand(dim, generator=g).sqrt()
        phi = 2 * math.pi * torch.rand(dim, generator=g)
        self.register_buffer("target_re", r * torch.cos(phi))
        self.register_buffer("target_im", r * torch.sin(phi))

    def eigenvalues(self) -> tuple[torch.Tensor, torch.Tensor]:
        # The 1e-6 keeps |lambda| < 1 in float32 too (exp(-exp(nu)) rounds to 1.0 once nu < -16.6).
        mod = torch.exp(-torch.exp(self.nu_log) - 1e-6)
        theta = torch.exp(self.theta_log)
        return mod * torch.cos(theta), mod * torch.sin(theta)

    def _p(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (nn.functional.normalize(self.P_re, dim=1, eps=1e-8),
                nn.functional.normalize(self.P_im, dim=1, eps=1e-8))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        p_re, p_im = self._p()
        lam_re, lam_im = self.eigenvalues()
        w_re, w_im = z @ self.P_inv_re.T, z @ self.P_inv_im.T          # Q z, Q = P_inv (complex)
        u_re = lam_re * w_re - lam_im * w_im                              # Lambda Q z
        u_im = lam_re * w_im + lam_im * w_re
        return u_re @ p_re.T - u_im @ p_im.T                              # Re(P Lambda Q z)

    def matrix(self) -> torch.Tensor:
        """The real d x d map actually applied to latents."""
        eye = torch.eye(self.dim, device=self.P_re.device, dtype=self.P_re.dtype)
        return self.forward(eye).T

    def inverse_loss(self) -> torch.Tensor:
        p_re, p_im = self._p()
        eye2 = torch.eye(2 * self.dim, device=p_re.device, dtype=p_re.dtype)
        p, q = _block(p_re, p_im), _block(self.P_inv_re, self.P_inv_im)
        return nn.functional.mse_loss(q @ p, eye2) + nn.functional.mse_loss(p @ q, eye2)

    def spectral_loss(self, kind: str) -> torch.Tensor:
        if kind == "none":
            return self.P_re.new_zeros(())
        if kind == "inverse":
            return self.inverse_loss()
        if kind == "unit-disk-uniform":
            lam_re, lam_im = self.eigenvalues()
            dist = torch.sqrt((lam_re - self.target_re) ** 2 + (lam_im - self.target_im) ** 2 + 1e-12)
            return dist.mean() + self.inverse_loss()
        raise ValueError(f"unknown spectral loss {kind!r}")


def make_operator(kind: str, dim: int) -> nn.Module:
    if kind == "linear":
        return LinearKoopman(dim)
    if kind == "factorized":
        return FactorizedKoopman(dim)
    raise ValueError(f"unknown Koopman operator {kind!r} (expected 'linear' or 'factorized')")
