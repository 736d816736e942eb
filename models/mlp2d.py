"""MLP observables for low-dimensional data (official checkerboard code).

Encoder: [x, t] -> (Linear + Swish) x layers; the last layer is activated too. Decoder: [z, t] ->
(Linear + Swish) x (layers - 1) -> Linear. Time is a scalar input: 0 for x_0, T for x_T.

An encoder may also see Fourier features of its point (``fourier_features`` = F > 0, not in the official
code): [x, sin(s 2^k x), cos(s 2^k x) for k < F, t], with s = ``fourier_scale`` (per coordinate, fixed).
"""
from __future__ import annotations

import torch
from torch import nn


class Swish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


def _with_time(x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return torch.cat([x, t.expand(x.shape[0]).unsqueeze(1) if t.dim() == 0 else t.reshape(-1, 1)], dim=1)


def fourier_features(x: torch.Tensor, num: int, scale: float) -> torch.Tensor:
    """[x, sin(scale 2^k x), cos(scale 2^k x) for k = 0..num-1], coordinates kept apart: (N, d (1 + 2 num))."""
    if num == 0:
        return x
    freqs = scale * 2.0 ** torch.arange(num, dtype=x.dtype, device=x.device)
    angles = (x.unsqueeze(-1) * freqs).flatten(1)   # (N, d * num)
    return torch.cat([x, torch.sin(angles), torch.cos(angles)], dim=1)


class MLPEncoder(nn.Module):
    def __init__(self, dim: int, hidden: int, latent_dim: int, layers: int, fourier: int = 0,
                 fourier_scale: float = 1.0):
        super().__init__()
        self.fourier, self.fourier_scale = fourier, fourier_scale
        widths = [dim * (1 + 2 * fourier) + 1] + [hidden] * (layers - 1) + [latent_dim]
        mods: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            mods += [nn.Linear(a, b), Swish()]
        self.main = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        return self.main(_with_time(fourier_features(x, self.fourier, self.fourier_scale), t))


class MLPDecoder(nn.Module):
    def __init__(self, dim: int, hidden: int, latent_dim: int, layers: int):
        super().__init__()
        widths = [latent_dim + 1] + [hidden] * (layers - 1) + [dim]
        mods: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            mods.append(nn.Linear(a, b))
            if i < layers - 1:
                mods.append(Swish())
        self.main = nn.Sequential(*mods)

    def forward(self, z: torch.Tensor, t: float | torch.Tensor = 0.0) -> torch.Tensor:
        return self.main(_with_time(z, t))
