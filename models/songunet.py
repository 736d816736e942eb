"""EDM's DDPM++ / NCSN++ U-Net (``SongUNet``, Karras et al. 2022, NVlabs/edm training/networks.py).

Same hyperparameters, weight initialisation, forward computation and state_dict layout as EDM, so
weights of an EDM-trained ``SongUNet`` (e.g. ``net.model`` of a released ``edm-*.pkl``) load with
``load_state_dict(..., strict=True)``:

* mapping: ``map_noise`` (no parameters), ``map_label``, ``map_augment``, ``map_layer0``, ``map_layer1``;
* ``enc``: ``{R}x{R}_conv``, ``{R}x{R}_down``, ``{R}x{R}_block{i}``, ``{R}x{R}_aux_{down,skip,residual}``;
* ``dec``: ``{R}x{R}_in0``, ``{R}x{R}_in1``, ``{R}x{R}_up``, ``{R}x{R}_block{i}``,
  ``{R}x{R}_aux_{up,norm,conv}``;
* blocks: ``norm0 conv0 affine norm1 conv1 skip norm2 qkv proj``; resampling convolutions carry the
  ``resample_filter`` buffer.

Used by KDM for all three image networks (encoders E_phi, E_varphi and decoder D_psi), and usable as
the teacher backbone.
"""
from __future__ import annotations

import contextlib

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

INIT_MODES = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")


def weight_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """EDM's initialisers (uniform ones are scaled to the same variance as the normal ones)."""
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f'Invalid init mode "{mode}" (expected one of {", ".join(INIT_MODES)})')


class Linear(nn.Module):
    """Fully connected layer with EDM initialisation: weight (out, in), bias (out)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 init_mode: str = "kaiming_normal", init_weight: float = 1, init_bias: float = 0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            x = x + self.bias.to(x.dtype)
        return x


class Conv2d(nn.Module):
    """Convolution with optional 2x up/down-sampling by a separable FIR filter (EDM semantics).

    ``kernel=0`` gives a parameter-free resampler. The normalised outer product of ``resample_filter``
    is kept as the ``resample_filter`` buffer, only for resampling layers (as in EDM's state_dict).
    ``float32_bias`` (``use_float32_bias``): under autocast, add the bias in float32, so activations
    between layers stay float32 (more precise; faster under torch.compile, slower eager).
    """

    float32_bias = False

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True,
                 up: bool = False, down: bool = False, resample_filter: Sequence[float] = (1, 1),
                 fused_resample: bool = False, init_mode: str = "kaiming_normal",
                 init_weight: float = 1, init_bias: float = 0):
        if up and down:
            raise ValueError("Conv2d cannot both up- and down-sample")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = (nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight)
                       if kernel else None)
        self.bias = nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        f = torch.as_tensor(list(resample_filter), dtype=torch.float32)
        f = torch.outer(f, f).unsqueeze(0).unsqueeze(1) / f.sum().square()
        self.register_buffer("resample_filter", f if up or down else None)
        # A resampling layer with the 2x2 box filter (EDM's resample_filter=[1, 1], DDPM++) resamples by
        # nearest-neighbour upsampling / 2x2 average pooling instead of grouped convolutions.
        self.box = bool((up or down) and _is_box(list(resample_filter)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        x = self._box_resample_conv(x, w, w_pad) if self.box else self._fir_resample_conv(x, w, w_pad)
        if self.bias is not None:   # in the convolution's output dtype (bf16 under autocast), as EDM's add_
            x = x + (self.bias.float() if self.float32_bias else self.bias.to(x.dtype)).reshape(1, -1, 1, 1)
        return x

    def _box_resample_conv(self, x: torch.Tensor, w: torch.Tensor | None, w_pad: int) -> torch.Tensor:
        """2x2 box filter (resample_filter=[1, 1], DDPM++): EDM's grouped (transposed) convolution with
        weights 1 (up) or 1/4 (down) is nearest-neighbour upsampling or 2x2 average pooling. Same values
        (exactly for up, to float rounding of four terms for down), without cuDNN's slow grouped kernels."""
        pool_last = self.fused_resample and w is not None     # EDM's fused path convolves first
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down and not pool_last:
            x = F.avg_pool2d(x, 2)
        if w is not None:
            x = F.conv2d(x, w, padding=w_pad)
        if self.down and pool_last:
            x = F.avg_pool2d(x, 2)
        return x

    def _fir_resample_conv(self, x: torch.Tensor, w: torch.Tensor | None, w_pad: int) -> torch.Tensor:
        """EDM's general path: FIR up/down-sampling as grouped (transposed) convolutions."""
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused_resample and self.up and w is not None:
            x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels,
                                   stride=2, padding=max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels,
                                       stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2,
                             padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        return x


class GroupNorm(nn.Module):
    """Group normalisation with at most ``num_groups`` groups of at least ``min_channels_per_group``."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4,
                 eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In the activations' dtype, as EDM's fp16 mode (the kernel accumulates statistics in float32):
        # autocast would upcast bf16/fp16 to float32 here and the next convolution cast back, two copies
        # of every activation per norm, forward and backward.
        low = x.dtype in (torch.float16, torch.bfloat16)
        with torch.autocast(x.device.type, enabled=False) if low else contextlib.nullcontext():
            return F.group_norm(x, num_groups=self.num_groups, weight=self.weight.to(x.dtype),
                                bias=self.bias.to(x.dtype), eps=self.eps)


class AttentionOp(torch.autograd.Function):
    """Attention weights softmax(q^T k / sqrt(C)) over keys, computed in float32 whatever the input dtype.

    q, k: (N, C, L). Returns (N, Lq, Lk). Only q, k and the weights are saved for backward.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        scale = 1 / np.sqrt(k.shape[1])
        w = torch.einsum("ncq,nck->nqk", q.to(torch.float32), (k * scale).to(torch.float32))
        w = w.softmax(dim=2).to(q.dtype)
        ctx.save_for_backward(q, k, w)
        return w

    @staticmethod
    def backward(ctx, dw: torch.Tensor):
        q, k, w = ctx.saved_tensors
        w32, dw32 = w.to(torch.float32), dw.to(torch.float32)
        db = w32 * (dw32 - (dw32 * w32).sum(dim=2, keepdim=True))   # softmax backward over dim 2
        scale = 1 / np.sqrt(k.shape[1])
        dq = torch.einsum("nck,nqk->ncq", k.to(torch.float32), db).to(q.dtype) * scale
        dk = torch.einsum("ncq,nqk->nck", q.to(torch.float32), db).to(k.dtype) * scale
        return dq, dk


class UNetBlock(nn.Module):
    """Residual block (+ optional resampling and self-attention) of the DDPM++/NCSN++/ADM U-Nets.

    ``attn_impl``: 'edm' (EDM's AttentionOp: weights in float32, then an einsum) or 'sdpa' (the same
    softmax(q^T k / sqrt(C)) v through torch's fused scaled_dot_product_attention); see use_fused_attention.
    """

    attn_impl = "edm"

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False,
                 down: bool = False, attention: bool = False, num_heads: int | None = None,
                 channels_per_head: int = 64, dropout: float = 0, skip_scale: float = 1, eps: float = 1e-5,
                 resample_filter: Sequence[float] = (1, 1), resample_proj: bool = False,
                 adaptive_scale: bool = True, init: dict | None = None,
                 init_zero: dict | None = None, init_attn: dict | None = None):
        super().__init__()
        init = dict(init or {})
        init_zero = dict(init_zero) if init_zero is not None else dict(init_weight=0)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down,
                            resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1,
                              **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))

        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))

        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = x + (self.skip(orig) if self.skip is not None else orig)
        x = x * self.skip_scale

        if self.num_heads:
            n, c = x.shape[0], x.shape[1]
            qkv = self.qkv(self.norm2(x)).reshape(n * self.num_heads, c // self.num_heads, 3, -1)
            if self.attn_impl == "sdpa":
                # (N*heads, C/heads, 3, L) -> q, k, v of shape (N*heads, 1, L, C/heads), made contiguous: the
                # fused kernels need a unit stride in the last dim; without it SDPA falls back to its math
                # path, which runs bf16/fp16 inputs as float32 matmuls.
                q, k, v = qkv.permute(2, 0, 3, 1).unsqueeze(2).contiguous().unbind(0)
                a = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2)
            else:
                q, k, v = qkv.unbind(2)
                w = AttentionOp.apply(q, k)
                a = torch.einsum("nqk,nck->ncq", w, v)
            x = self.proj(a.reshape(*x.shape)) + x
            x = x * self.skip_scale
        return x


def use_float32_bias(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Under autocast, add every Conv2d's bias inside ``module`` in float32 (activations between layers
    stay float32), or back to the output dtype (the default). No parameters change. Returns ``module``."""
    for m in module.modules():
        if isinstance(m, Conv2d):
            m.float32_bias = enabled
    return module


def use_box_resampling(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Resample every 2x2-box-filter Conv2d inside ``module`` by nearest-neighbour upsampling / average
    pooling (the default), or by EDM's grouped convolutions (``enabled=False``: the official kernels, e.g.
    for a reference timing). Same values; other filters always use the convolutions. Returns ``module``."""
    for m in module.modules():
        if isinstance(m, Conv2d) and m.resample_filter is not None:
            m.box = enabled and _is_box(m.resample_filter[0, 0, 0].tolist())
    return module


def _is_box(taps: Sequence[float]) -> bool:
    """Whether a 1-D resampling filter is the 2-tap box (any [a, a]: normalised, all weights 1/4)."""
    return len(taps) == 2 and taps[0] == taps[1]


def use_fused_attention(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch every UNetBlock inside ``module`` to torch's fused attention (or back to EDM's op).

    Same function, different rounding: no parameters or state_dict keys change. Returns ``module``.
    """
    for m in module.modules():
        if isinstance(m, UNetBlock):
            m.attn_impl = "sdpa" if enabled else "edm"
    return module


class PositionalEmbedding(nn.Module):
    """Transformer-style sinusoidal embedding of a scalar: [cos(x f_k), sin(x f_k)], f_k = max^(-k/K)."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(start=0, end=half, dtype=torch.float32, device=x.device)
        freqs = freqs / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of a scalar (NCSN++); the frequencies are a persistent buffer."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.outer(x, (2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class SongUNet(nn.Module):
    """DDPM++ (positional embedding, standard encoder/decoder) and NCSN++ (Fourier, residual/skip).

    ``forward(x, noise_labels, class_labels=None, augment_labels=None)``: x (B, in_channels, R, R),
    noise_labels (B,), class_labels (B, label_dim) one-hot floats (zeros when omitted, as EDM's
    preconditioners do), augment_labels (B, augment_dim) or None. Returns (B, out_channels, R, R).
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2, 2),
                 channel_mult_emb: int = 4, num_blocks: int = 4, attn_resolutions: Sequence[int] = (16,),
                 dropout: float = 0.10, label_dropout: float = 0, embedding_type: str = "positional",
                 channel_mult_noise: int = 1, encoder_type: str = "standard", decoder_type: str = "standard",
                 resample_filter: Sequence[float] = (1, 1)):
        if embedding_type not in ("fourier", "positional"):
            raise ValueError(f"embedding_type must be 'fourier' or 'positional', got {embedding_type!r}")
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(f"encoder_type must be 'standard', 'skip' or 'residual', got {encoder_type!r}")
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"decoder_type must be 'standard' or 'skip', got {decoder_type!r}")
        super().__init__()
        channel_mult = list(channel_mult)
        attn_resolutions = list(attn_resolutions)
        resample_filter = list(resample_filter)
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.label_dim = label_dim
        self.augment_dim = augment_dim
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=np.sqrt(0.2))
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=np.sqrt(0.5),
                            eps=1e-6, resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                            init=init, init_zero=init_zero, init_attn=init_attn)

        # Mapping network: noise (+ label + augment) embedding -> two-layer MLP.
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(num_channels=noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder.
        self.enc = nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, kernel=0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, kernel=3, down=True,
                                                                   resample_filter=resample_filter,
                                                                   fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if "aux" not in name]

        # Decoder.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(num_channels=cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        # Mapping.
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # cos/sin -> sin/cos
        if self.map_label is not None:
            labels = class_labels
            if labels is None:
                labels = torch.zeros(x.shape[0], self.map_label.in_features, device=x.device, dtype=emb.dtype)
            if self.training and self.label_dropout:
                keep = torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels * np.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))

        # Encoder.
        skips = []
        aux = x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / np.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        # Decoder.
        aux = None
        tmp = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
