"""Device selection: a GPU that was asked for and is absent is an error, never a silent CPU fallback."""
from __future__ import annotations

import torch

from pipeline.errors import KDMError


def resolve_device(name: str) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise KDMError(f"device {name!r} was requested but no CUDA GPU is visible "
                           f"(torch.cuda.is_available() is False); run on a GPU worker or pass device=cpu")
        return torch.device(name)
    raise KDMError(f"unknown device {name!r}: use 'cpu' or 'cuda'")
