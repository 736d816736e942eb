"""KDM objective (paper Eq. 4-7): L_rec + L_lat + L_pred (+ spectral penalty of KDM-F)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .kdm2d import KDMForward


def kdm_losses(x0: torch.Tensor, out: KDMForward, use_pred_loss: bool = True) -> dict[str, torch.Tensor]:
    """Returns each term and ``total``. L_lat targets the clean z_0 (Alg. 1, line 10); the KDM-F spectral
    penalty ``out.spectral`` is added when the pass computed it.

    With ``use_pred_loss=False`` the total is the official checkerboard objective (L_rec + L_lat);
    L_pred is then still reported (when the push was decoded) but carries no gradient into the total.
    """
    losses = {
        "rec": F.mse_loss(out.x0_rec, x0),
        "lat": F.mse_loss(out.z_push, out.z0),
    }
    total = losses["rec"] + losses["lat"]
    if out.x0_push is not None:
        losses["pred"] = F.mse_loss(out.x0_push, x0)
        if use_pred_loss:
            total = total + losses["pred"]
    elif use_pred_loss:
        raise ValueError("use_pred_loss=True needs the decoded push (forward(..., decode_push=True))")
    if out.spectral is not None:
        losses["spectral"] = out.spectral
        total = total + out.spectral
    losses["total"] = total
    return losses
