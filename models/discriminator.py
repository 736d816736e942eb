"""Discriminator D_gamma of the official image KDM and its non-saturating BCE losses (paper Eq. 8).

Four convolutions with BatchNorm, PyTorch default init (663,745 parameters for 3 input channels):
Conv(c->64, k4 s2 p1) LReLU(0.2) | Conv(64->128, k4 s2 p1) BN LReLU | Conv(128->256, k4 s2 p1) BN LReLU |
Conv(256->1, k4 s1 p0) | Flatten. One logit per 32x32 image; a 5x5 = 25-logit patch map at 64x64.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Discriminator(nn.Module):
    def __init__(self, in_channels: int = 3, width: int = 64):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(in_channels, width, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1),
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 4 * width, 4, 2, 1),
            nn.BatchNorm2d(4 * width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(4 * width, 1, 4, 1, 0),
            nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, R, R) with R >= 32 -> logits (B, ((R/8) - 3)^2)."""
        return self.main(x)


def generator_adversarial_loss(d_fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator term BCE(D(x_push), 1), averaged over all logits."""
    return F.binary_cross_entropy_with_logits(d_fake_logits, torch.ones_like(d_fake_logits))


def discriminator_loss(d_real_logits: torch.Tensor, d_fake_logits: torch.Tensor) -> torch.Tensor:
    """BCE(D(x_0), 1) + BCE(D(x_push), 0); pass logits of detached images."""
    return (F.binary_cross_entropy_with_logits(d_real_logits, torch.ones_like(d_real_logits))
            + F.binary_cross_entropy_with_logits(d_fake_logits, torch.zeros_like(d_fake_logits)))


def adversarial_losses(d_real_logits: torch.Tensor, d_fake_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Both terms from one set of logits: ``discriminator`` and ``generator`` (non-saturating).

    The official step order updates D first and then evaluates the generator term with a fresh pass of
    the updated D on the non-detached push; use ``generator_adversarial_loss`` on those logits for that.
    """
    return {"discriminator": discriminator_loss(d_real_logits, d_fake_logits),
            "generator": generator_adversarial_loss(d_fake_logits)}
