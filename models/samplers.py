"""Samplers as pure functions: fixed-step ODE solvers and per-seed noise."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_keep(keep: Sequence[int], steps: int) -> list[int]:
    keep = [int(k) for k in keep]
    if keep != sorted(set(keep)) or any(not 1 <= k < steps for k in keep):
        raise ValueError(f"states to keep {keep} must be increasing step numbers in [1, {steps - 1}] (the state "
                         f"after that many of the {steps} steps)")
    return keep


@torch.no_grad()
def integrate_ode(velocity: Velocity, x: torch.Tensor, steps: int, method: str = "midpoint",
                  t0: float = 0.0, t1: float = 1.0, keep: Sequence[int] = ()):
    """Integrate dx/dt = v(x, t) from t0 to t1 with `steps` equal steps (euler | midpoint | heun).

    ``keep``: step numbers k (1 <= k < steps, increasing) whose states x(t0 + k h) are returned too, as
    (x_1, (B, len(keep), ...) tensor); without them only x_1 (the integration is the same either way)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    keep = _check_keep(keep, steps)
    kept = []
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
        if i + 1 in keep:
            kept.append(x)
    return (x, torch.stack(kept, dim=1)) if keep else x


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


def edm_latents(seeds: Sequence[int], shape: Sequence[int], label_dim: int = 0,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
    """EDM generate.py's ``StackedRandomGenerator``: per seed, ``torch.Generator(device)`` seeded with
    ``seed % 2**32`` draws ``randn(shape)``; for a conditional net (label_dim > 0) the same generator then
    draws the class ``randint(label_dim)``. Returns (eps (B, *shape) float32 on ``device``, class ids
    (B,) int64 or None). With device='cuda' the latents are EDM's for the same seeds; the CPU stream
    (default) differs from CUDA's but makes a sample independent of the machine."""
    eps = torch.empty((len(seeds), *shape), dtype=torch.float32, device=device)
    labels = torch.empty(len(seeds), dtype=torch.int64, device=device) if label_dim else None
    for i, s in enumerate(seeds):
        g = torch.Generator(device).manual_seed(int(s) % (1 << 32))
        eps[i] = torch.randn(tuple(shape), generator=g, device=device)
        if labels is not None:
            labels[i] = torch.randint(label_dim, size=(), generator=g, device=device)
    return eps, labels


def edm_time_steps(num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """EDM's noise levels t_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
    i < N, then t_N = 0 (float64, N + 1 values)."""
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2, got {num_steps}")
    idx = torch.arange(num_steps, dtype=torch.float64, device=device)
    t = (sigma_max ** (1 / rho) + idx / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros_like(t[:1])])


@torch.no_grad()
def edm_heun(denoiser, x_T: torch.Tensor, class_labels: torch.Tensor | None = None, num_steps: int = 18,
             sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
             state_dtype: torch.dtype = torch.float64, keep: Sequence[int] = ()):
    """EDM's deterministic sampler (generate.py ``edm_sampler`` with S_churn=0): Heun steps between the
    noise levels of ``edm_time_steps``, Euler on the last step (NFE = 2 num_steps - 1), state in float64.

    ``x_T`` is the start already scaled by sigma_max (x_T = sigma_max * eps). ``denoiser`` is any
    ``models.edm.Denoiser``; sigma_min/sigma_max are clamped to its supported range as in EDM, and a
    clamp of sigma_max (which would not match the given x_T) is an error. Returns x_0 in ``state_dtype``
    (float64 as in EDM; the fast path keeps the state in float32).

    ``keep``: step numbers k (1 <= k < num_steps, increasing) whose states, at noise level t_k of
    ``edm_time_steps`` (``edm_levels``), are returned too, as (x_0, (B, len(keep), ...) tensor in
    ``state_dtype``); the sampling itself is the same with or without them.
    """
    keep = _check_keep(keep, num_steps)
    kept = []
    sigma_min = max(sigma_min, float(getattr(denoiser, "sigma_min", 0.0)))
    net_max = float(getattr(denoiser, "sigma_max", float("inf")))
    if net_max < sigma_max:
        raise ValueError(f"x_T is scaled by sigma_max={sigma_max}, but the denoiser supports sigma <= {net_max}; "
                         f"use sigma_max={net_max} (and x_T = {net_max} * eps)")
    round_sigma = getattr(denoiser, "round_sigma", torch.as_tensor)
    t_steps = edm_time_steps(num_steps, sigma_min, sigma_max, rho, device=x_T.device)
    t_steps = torch.cat([torch.as_tensor(round_sigma(t_steps[:-1]), dtype=torch.float64, device=x_T.device),
                         t_steps[-1:]]).to(state_dtype)
    x_next = x_T.to(state_dtype)
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        t_hat = torch.as_tensor(round_sigma(t_cur), dtype=state_dtype, device=x_T.device)   # gamma = 0
        x_hat = x_cur
        denoised = denoiser(x_hat, t_hat, class_labels).to(state_dtype)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            denoised = denoiser(x_next, t_next, class_labels).to(state_dtype)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        if i + 1 in keep:
            kept.append(x_next)
    return (x_next, torch.stack(kept, dim=1)) if keep else x_next


def edm_levels(denoiser, num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0,
               rho: float = 7.0) -> list[float]:
    """The noise levels edm_heun's states pass through for ``denoiser``, t_0 = sigma_max ... t_N = 0, as floats
    (sigma_min clamped to the denoiser's range and rounded with its ``round_sigma``, as the sampler does)."""
    sigma_min = max(sigma_min, float(getattr(denoiser, "sigma_min", 0.0)))
    round_sigma = getattr(denoiser, "round_sigma", torch.as_tensor)
    t = edm_time_steps(num_steps, sigma_min, sigma_max, rho)
    t = torch.cat([torch.as_tensor(round_sigma(t[:-1]), dtype=torch.float64), t[-1:]])
    return [float(v) for v in t]
