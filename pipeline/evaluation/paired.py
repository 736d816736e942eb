"""Paired errors (a model's output against the teacher's, row for row) and the standard error of their mean.

Shared by the 2-D evaluation (held-out pair MSE) and the image evaluation (held-out MSE, LPIPS): numpy only, so
it costs nothing to import.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def pair_errors(pred: Any, target: Any) -> np.ndarray:
    """Each row's squared error, averaged over its elements, in float64 (N,): row i of ``pred`` against row i
    of ``target`` (arrays or tensors of one shape). Their mean is the mean over all elements."""
    pred, target = _numpy(pred), _numpy(target)
    if pred.shape != target.shape:
        raise ValueError(f"shape mismatch: pred {pred.shape} vs target {target.shape}")
    diff = pred.astype(np.float64) - target.astype(np.float64)
    return (diff ** 2).reshape(len(diff), -1).mean(axis=1) if diff.ndim > 1 else diff ** 2


def standard_error(values: Any) -> Optional[float]:
    """std / sqrt(n) of per-sample values: the standard error of their mean (None for fewer than two). On the
    checkerboard a few pairs carry most of the pair MSE (RESULTS.md), so two means differ meaningfully only by
    several of these."""
    v = _numpy(values).astype(np.float64).ravel()
    return float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None
