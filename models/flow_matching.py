"""Flow-matching teacher for low-dimensional data: velocity MLP v(x, t) on the conditional OT path
x_t = (1 - t) x_noise + t x_data, target velocity x_data - x_noise (t=0 noise, t=1 data).
"""
from __future__ import annotations

import torch
from torch import nn

from .mlp2d import Swish


class VelocityMLP(nn.Module):
    def __init__(self, dim: int = 2, hidden: int = 512, layers: int = 4):
        super().__init__()
        mods: list[nn.Module] = [nn.Linear(dim + 1, hidden), Swish()]
        for _ in range(layers - 1):
            mods += [nn.Linear(hidden, hidden), Swish()]
        mods.append(nn.Linear(hidden, dim))
        self.main = nn.Sequential(*mods)
        self.dim = dim

    def forward(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        t = t.expand(x.shape[0]) if t.dim() == 0 else t.reshape(-1)
        return self.main(torch.cat([x, t[:, None]], dim=1))


def cond_ot_loss(model: VelocityMLP, x_data: torch.Tensor, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    noise = torch.randn(x_data.shape, generator=generator, device=x_data.device, dtype=x_data.dtype)
    t = torch.rand(x_data.shape[0], generator=generator, device=x_data.device, dtype=x_data.dtype)
    x_t = (1 - t[:, None]) * noise + t[:, None] * x_data
    return torch.mean((model(x_t, t) - (x_data - noise)) ** 2)
