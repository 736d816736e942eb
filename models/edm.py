"""EDM preconditioning, EDM training losses, and the denoiser interface every teacher exposes.

The preconditioners follow NVlabs/edm training/networks.py (Karras et al. 2022): same constructor
arguments, attribute names (``img_resolution``, ``img_channels``, ``label_dim``, ``use_fp16``,
``sigma_min``, ``sigma_max``, ``sigma_data``, ``beta_d``, ``beta_min``, ``M``, ``epsilon_t``, ``model``)
and forward computation, so the state_dict of a released EDM network (``model.*`` keys) loads with
``strict=True``. The wrapped network is ``models.songunet.SongUNet`` (EDM's DDPM++/NCSN++); EDM's
``DhariwalUNet`` (ADM, ImageNet) is not provided, so ``model_type`` must be 'SongUNet' (the default
here, where EDM's EDMPrecond defaults to 'DhariwalUNet').

Denoiser interface (``Denoiser``): ``D(x, sigma, class_labels=None) -> E[x_0 | x]`` for
x = x_0 + sigma * n, with attributes ``sigma_min``, ``sigma_max``, ``label_dim`` and ``round_sigma``.
The EDM preconditioners implement it directly; ``FlowMatchingDenoiser`` adapts a flow-matching
velocity model v(x, t) (2-D MLP or image network), so one sampler (``models.samplers.edm_heun``)
serves every teacher.
"""
from __future__ import annotations

from typing import Callable, Optional, Protocol, runtime_checkable

import torch
from torch import nn

from .songunet import SongUNet

MODEL_TYPES = {"SongUNet": SongUNet}


@runtime_checkable
class Denoiser(Protocol):
    sigma_min: float
    sigma_max: float
    label_dim: int

    def __call__(self, x: torch.Tensor, sigma, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor: ...

    def round_sigma(self, sigma) -> torch.Tensor: ...


def _make_model(model_type: str, **kwargs) -> nn.Module:
    try:
        cls = MODEL_TYPES[model_type]
    except KeyError:
        raise ValueError(f"model_type {model_type!r} is not available (supported: {', '.join(MODEL_TYPES)}); "
                         f"EDM's DhariwalUNet (ADM) is not part of kdm") from None
    return cls(**kwargs)


def _prepare(net, x: torch.Tensor, sigma, class_labels, force_fp32: bool):
    """EDM's common preamble: float32 x, sigma as (B|1, 1, 1, 1), labels (B|1, label_dim) or None."""
    x = x.to(torch.float32)
    sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
    if net.label_dim == 0:
        class_labels = None
    elif class_labels is None:
        class_labels = torch.zeros([1, net.label_dim], device=x.device)
    else:
        class_labels = class_labels.to(torch.float32).reshape(-1, net.label_dim)
    use_fp16 = net.use_fp16 and not force_fp32 and x.device.type == "cuda"
    dtype = torch.float16 if use_fp16 else torch.float32
    return x, sigma, class_labels, dtype


def _vp_sigma(t, beta_d: float, beta_min: float) -> torch.Tensor:
    """The VP noise level sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) (EDM's VP schedule)."""
    t = torch.as_tensor(t)
    return ((0.5 * beta_d * (t ** 2) + beta_min * t).exp() - 1).sqrt()


class _Precond(nn.Module):
    """What EDM's preconditioners share: the interface attributes, the wrapped network ``model`` and
    D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16

    def _build_model(self, model_type: str, model_kwargs: dict) -> None:
        self.model = _make_model(model_type, img_resolution=self.img_resolution, in_channels=self.img_channels,
                                 out_channels=self.img_channels, label_dim=self.label_dim, **model_kwargs)

    def _denoise(self, x, class_labels, dtype, c_skip, c_out, c_in, c_noise, model_kwargs):
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        return c_skip * x + c_out * F_x.to(torch.float32)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


class VPPrecond(_Precond):
    """Variance-preserving preconditioning (Song et al. 2021, DDPM++ 'VP' baseline)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000, epsilon_t: float = 1e-5,
                 model_type: str = "SongUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1))
        self._build_model(model_type, model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels, dtype = _prepare(self, x, sigma, class_labels, force_fp32)
        c_skip = 1
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return self._denoise(x, class_labels, dtype, c_skip, c_out, c_in, c_noise, model_kwargs)

    def sigma(self, t):
        return _vp_sigma(t, self.beta_d, self.beta_min)

    def sigma_inv(self, sigma):
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d


class VEPrecond(_Precond):
    """Variance-exploding preconditioning (Song et al. 2021, NCSN++ 'VE' baseline)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0.02, sigma_max: float = 100, model_type: str = "SongUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self._build_model(model_type, model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels, dtype = _prepare(self, x, sigma, class_labels, force_fp32)
        c_skip = 1
        c_out = sigma
        c_in = 1
        c_noise = (0.5 * sigma).log()
        return self._denoise(x, class_labels, dtype, c_skip, c_out, c_in, c_noise, model_kwargs)


class EDMPrecond(_Precond):
    """EDM preconditioning (Karras et al. 2022, Table 1): what the released ``edm-*.pkl`` networks use."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0, sigma_max: float = float("inf"), sigma_data: float = 0.5,
                 model_type: str = "SongUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self._build_model(model_type, model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels, dtype = _prepare(self, x, sigma, class_labels, force_fp32)
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        return self._denoise(x, class_labels, dtype, c_skip, c_out, c_in, c_noise, model_kwargs)


PRECONDS = {"VPPrecond": VPPrecond, "VEPrecond": VEPrecond, "EDMPrecond": EDMPrecond}


# --- losses (training/loss.py) -------------------------------------------------------------------------
#
# Each returns the per-element weighted loss, as EDM; EDM's training loop sums it and divides by the
# batch size (``loss.sum() / batch``). ``generator`` (optional) makes sigma and noise reproducible.

def _augment(images, augment_pipe):
    return augment_pipe(images) if augment_pipe is not None else (images, None)


class VPLoss:
    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, epsilon_t: float = 1e-5):
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.epsilon_t = epsilon_t

    def __call__(self, net, images, labels=None, augment_pipe=None, generator=None):
        rnd_uniform = torch.rand([images.shape[0], 1, 1, 1], device=images.device, generator=generator)
        sigma = self.sigma(1 + rnd_uniform * (self.epsilon_t - 1))
        weight = 1 / sigma ** 2
        y, augment_labels = _augment(images, augment_pipe)
        n = torch.randn(y.shape, device=y.device, generator=generator) * sigma
        D_yn = net(y + n, sigma, labels, augment_labels=augment_labels)
        return weight * ((D_yn - y) ** 2)

    def sigma(self, t):
        return _vp_sigma(t, self.beta_d, self.beta_min)


class VELoss:
    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100):
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def __call__(self, net, images, labels=None, augment_pipe=None, generator=None):
        rnd_uniform = torch.rand([images.shape[0], 1, 1, 1], device=images.device, generator=generator)
        sigma = self.sigma_min * ((self.sigma_max / self.sigma_min) ** rnd_uniform)
        weight = 1 / sigma ** 2
        y, augment_labels = _augment(images, augment_pipe)
        n = torch.randn(y.shape, device=y.device, generator=generator) * sigma
        D_yn = net(y + n, sigma, labels, augment_labels=augment_labels)
        return weight * ((D_yn - y) ** 2)


class EDMLoss:
    """ln(sigma) ~ N(P_mean, P_std^2); weight (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2."""

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def __call__(self, net, images, labels=None, augment_pipe=None, generator=None):
        rnd_normal = torch.randn([images.shape[0], 1, 1, 1], device=images.device, generator=generator)
        sigma = (rnd_normal * self.P_std + self.P_mean).exp()
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        y, augment_labels = _augment(images, augment_pipe)
        n = torch.randn(y.shape, device=y.device, generator=generator) * sigma
        D_yn = net(y + n, sigma, labels, augment_labels=augment_labels)
        return weight * ((D_yn - y) ** 2)


LOSSES = {"vp": VPLoss, "ve": VELoss, "edm": EDMLoss}


# --- flow-matching adapter -----------------------------------------------------------------------------

class FlowMatchingDenoiser(nn.Module):
    """A flow-matching velocity model as an EDM denoiser.

    The conditional OT path x_t = (1 - t) n + t x_0 (t=0 noise, t=1 data, velocity target x_0 - n) is,
    after dividing by t, the EDM path x = x_0 + sigma n with sigma = (1 - t) / t. Hence for an EDM state
    x at level sigma: t = 1 / (1 + sigma), x_t = t x, and the data estimate is
    D(x, sigma) = x_t + (1 - t) v(x_t, t). EDM's Heun sampler on D then integrates the same ODE as the
    velocity model's own ODE (up to the step placement). ``velocity(x, t)`` takes t of shape (B,); a
    conditional velocity model (label_dim > 0) is called as velocity(x, t, class_labels).
    """

    def __init__(self, velocity: Callable, label_dim: int = 0, sigma_min: float = 0.0,
                 sigma_max: float = float("inf")):
        super().__init__()
        self.velocity = velocity
        self.label_dim = label_dim
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def forward(self, x, sigma, class_labels=None):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        t = 1 / (1 + sigma)
        tb = t.reshape(-1, *([1] * (x.dim() - 1)))
        x_t = tb * x
        v = self.velocity(x_t, t, class_labels) if self.label_dim else self.velocity(x_t, t)
        return x_t + (1 - tb) * v.to(torch.float32)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


class FastDenoiser(nn.Module):
    """A denoiser run the fast way: bf16 (or fp16) autocast with float32 preconditioning and output,
    channels_last U-Net, torch's fused attention, optionally ``torch.compile``; same interface as the
    wrapped one. fp16 keeps 3 more mantissa bits than bf16 (less drift); EDM's own fast mode is fp16.

    The reference (EDM's generate.py) is the plain denoiser in float32 with the Heun state in float64;
    pipeline pair generation records which one produced a store (SamplerSettings.precision).
    """

    def __init__(self, denoiser: nn.Module, compile: bool = False, dtype: torch.dtype = torch.bfloat16,
                 compile_mode: str | None = None):
        super().__init__()
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"FastDenoiser runs in bfloat16 or float16, not {dtype}")
        self.dtype = dtype
        from .songunet import use_fused_attention
        self.inner = use_fused_attention(denoiser.to(memory_format=torch.channels_last))
        self.label_dim = getattr(denoiser, "label_dim", 0)
        self.sigma_min = getattr(denoiser, "sigma_min", 0.0)
        self.sigma_max = getattr(denoiser, "sigma_max", float("inf"))
        self._call = torch.compile(self.inner, mode=compile_mode) if compile else self.inner

    def round_sigma(self, sigma):
        return self.inner.round_sigma(sigma)

    def forward(self, x, sigma, class_labels=None):
        x = x.to(torch.float32).contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self._call(x, sigma, class_labels).to(torch.float32)
