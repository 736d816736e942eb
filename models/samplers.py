"""Samplers as pure functions: fixed-step ODE solvers and per-seed noise."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def integrate_ode(velocity: Velocity, x: torch.Tensor, steps: int, method: str = "midpoint",
                  t0: float = 0.0, t1: float = 1.0) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from t0 to t1 with `steps` equal steps (euler | midpoint | heun)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    h = (t1 - t0) / steps
    for i in range(steps):
        t = torch.full((x.shape[0],), t0 + i * h, dtype=x.dtype, device=x.device)
        if method == "euler":
            x = x + h * velocity(x, t)
        elif method == "midpoint":
            x = x + h * velocity(x + 0.5 * h * velocity(x, t), t + 0.5 * h)
        elif method == "heun":
            v0 = velocity(x, t)
            x1 = x + h * v0
            x = x + 0.5 * h * (v0 + velocity(x1, t + h))
        else:
            raise ValueError(f"unknown ODE method {method!r} (euler, midpoint, heun)")
    return x


def seeded_noise(seeds: Sequence[int], shape: Sequence[int], scale: float = 1.0,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One N(0, I) draw per seed from its own CPU generator (EDM's per-sample seeding): a sample
    depends only on its seed, never on batch composition or device."""
    out = torch.empty((len(seeds), *shape), dtype=torch.float32)
    g = torch.Generator()
    for i, s in enumerate(seeds):
        g.manual_seed(int(s))
        out[i] = torch.randn(tuple(shape), generator=g)
    return (out * scale).to(dtype)
