"""The official KDM checkerboard: x1 ~ U(low, high), x2 in cells with floor(x1)+floor(x2) even,
all divided by `scale` (0.45). 8 filled cells of a 4x4 board."""
from __future__ import annotations

import torch


def sample_checkerboard(n: int, generator: torch.Generator | None = None, low: float = -2.0,
                        high: float = 2.0, scale: float = 0.45) -> torch.Tensor:
    """Uniform over the filled cells (the official sampler's distribution, any even-width board)."""
    cells = int(round(high - low))
    if cells != high - low or cells % 2 or int(low) != low:
        raise ValueError(f"board [{low}, {high}) must have integer bounds and an even number of cells")
    x1 = torch.rand(n, generator=generator) * cells + low
    col = torch.floor(x1)
    row_pair = torch.randint(0, cells // 2, (n,), generator=generator)
    row = low + 2 * row_pair + (col - low).remainder(2)
    x2 = row + torch.rand(n, generator=generator)
    return torch.stack([x1, x2], dim=1) / scale


def in_cell(x: torch.Tensor, low: float = -2.0, high: float = 2.0, scale: float = 0.45) -> torch.Tensor:
    """Boolean mask: the point lies on the board and in a filled cell."""
    u = x * scale
    inside = (u >= low).all(dim=1) & (u < high).all(dim=1)
    parity = (torch.floor(u[:, 0]) + torch.floor(u[:, 1])).remainder(2) == 0
    return inside & parity
