"""The pipeline's own perceptual network and the LPIPS-style distance ``lpips-own`` on its features.

``PerceptualConvNet`` is a small VGG-style CIFAR classifier (``storage_schemas.perceptual`` documents
the recipe; ``pipeline.training.perceptual`` trains it and writes / loads the artifact). Like the
evaluation extractor (``pipeline.evaluation.features.ResNet9``) it takes float images in [0, 255] and
holds its input normalisation (training-set mean and std) as buffers, but it is another architecture:
plain conv-BN-ReLU stages with average pooling, no residual connections, no max pooling.

``OwnLPIPS(net)`` is LPIPS's structure (Zhang et al. 2018, Eq. 1) with *uniform* linear heads (the
paper's "baseline" variant without learned weights: there is no human-judgment data offline to learn
them from). For images x, y in [-1, 1] and each tapped layer l with feature maps f_l (C_l, H_l, W_l):

    d_l(x, y) = mean_{h,w} sum_c (u_l(x)_{chw} - u_l(y)_{chw})^2,   u_l = f_l / sqrt(sum_c f_l^2 + eps)

and d(x, y) = mean_l d_l(x, y) (mean, not sum, over the 4 layers, so 0 <= d <= 4 whatever the
number of taps). x and y go through the network as one batch (no batch-coupled layers: BatchNorm is
frozen in eval mode); the trunk runs in whatever autocast is active (bf16 in training), the unit
normalisation and differences in float32; channels_last inputs stay channels_last through the convs.
The normaliser uses ``rsqrt(sum + eps)`` rather than ``1 / (norm + eps)`` so that the gradient is
finite where a location has no active channel. The network is frozen (no parameter gradients);
gradients flow to the inputs.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

NORM_EPS = 1e-10


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class PerceptualConvNet(nn.Module):
    """VGG-style: stages of (w, 2w, 4w, 8w) channels, two conv-BN-ReLU each, 2x2 average pooling between
    stages; global average pooling -> linear (no bias) * 0.125. ``taps`` returns the last ReLU of each
    stage; ``forward`` the logits. Inputs are float images in [0, 255]."""

    arch = "vgg-avg"

    def __init__(self, width: int = 32, num_classes: int = 10, channels: int = 3):
        super().__init__()
        w = width
        self.register_buffer("mean", torch.full((1, channels, 1, 1), 127.5))
        self.register_buffer("std", torch.full((1, channels, 1, 1), 127.5))
        widths = (w, 2 * w, 4 * w, 8 * w)
        stages, cin = [], channels
        for i, c in enumerate(widths):
            layers: list[nn.Module] = [nn.AvgPool2d(2)] if i else []
            layers += _conv_bn_relu(cin, c) + _conv_bn_relu(c, c)
            stages.append(nn.Sequential(*layers))
            cin = c
        self.stages = nn.ModuleList(stages)
        self.layer_channels = widths
        self.fc = nn.Linear(widths[-1], num_classes, bias=False)
        self.logit_scale = 0.125

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = (x - self.mean) / self.std
        out = []
        for stage in self.stages:
            h = stage(h)
            out.append(h)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.taps(x)[-1].mean(dim=(2, 3))) * self.logit_scale


def unit_normalize(f: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """f / sqrt(sum_c f^2 + eps) over the channel dimension, in float32."""
    f = f.float()
    return f * torch.rsqrt(f.square().sum(dim=1, keepdim=True) + eps)


class OwnLPIPS(nn.Module):
    """LPIPS-style distance with uniform heads on a ``PerceptualConvNet``; forward(x, y) -> (B,) float32.

    ``net_id`` / ``sha256`` name the network (recorded in the student manifest and reports as
    ``lpips-own:<net_id>``). The evaluation's feature extractor (a ``ResNet9`` / ``FeatureExtractor``)
    is refused: the student must never be trained on the metric's own features.
    """

    def __init__(self, net: nn.Module, net_id: str = "untracked", sha256: Optional[str] = None):
        super().__init__()
        if not isinstance(net, PerceptualConvNet):
            raise TypeError(f"distance 'lpips-own' runs on the pipeline's perceptual network (PerceptualConvNet), "
                            f"not {type(net).__name__}: the evaluation's FD/KID extractor is never a training "
                            f"distance; train one with pipeline.training.perceptual.train_perceptual_net")
        self.net = net.eval().requires_grad_(False)
        self.net_id = net_id
        self.sha256 = sha256

    @property
    def name(self) -> str:
        return f"lpips-own:{self.net_id}"

    def train(self, mode: bool = True) -> "OwnLPIPS":
        return super().train(False)   # BatchNorm always uses its running statistics

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.against(y, x)[0]

    def against(self, ref: torch.Tensor, *xs: torch.Tensor) -> list[torch.Tensor]:
        """[d(x, ref) for x in xs], with ``ref`` and every ``x`` through the network in one batch (the
        training step's L_rec and L_pred share x_0's features this way). Each value has shape (B,)."""
        for x in xs:
            if x.shape != ref.shape:
                raise ValueError(f"distance inputs differ in shape: {tuple(x.shape)} vs {tuple(ref.shape)}")
        b = ref.shape[0]
        batch = torch.cat([t.float() for t in (ref, *xs)]).add(1.0).mul(127.5)   # [-1, 1] -> [0, 255]
        totals = [batch.new_zeros(b) for _ in xs]
        taps = self.net.taps(batch)
        for f in taps:
            u = unit_normalize(f)
            u_ref = u[:b]
            for i in range(len(xs)):
                totals[i] = totals[i] + (u[(i + 1) * b:(i + 2) * b] - u_ref).square().sum(dim=1).mean(dim=(1, 2))
        return [t / len(taps) for t in totals]
