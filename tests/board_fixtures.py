"""A tiny checkerboard-like pair store for the 2-D tests: 3-row trajectories (x_T, the midpoint, x_0 = the sign
of x_T times ``scale`` plus noise) imported with ``kdm pairs import``'s code into ``root/store``."""
from pathlib import Path

import numpy as np


def tiny_board_store(root: Path, n: int = 300, scale: float = 2.0, noise: float = 0.1,
                     holdout_fraction: float = 0.2, seed: int = 0) -> str:
    from pipeline.pairs.importer import import_pairs
    from storage_schemas import PairsImportConfig
    rng = np.random.default_rng(seed)
    traj = np.zeros((3, n, 2), np.float32)
    traj[0] = rng.standard_normal((n, 2))
    traj[-1] = np.sign(traj[0]) * scale + noise * rng.standard_normal((n, 2))
    traj[1] = (traj[0] + traj[-1]) / 2
    np.save(root / "traj.npy", traj)
    out = str(root / "store")
    import_pairs(str(root / "traj.npy"), PairsImportConfig(holdout_fraction=holdout_fraction, chunk_size=100), out)
    return out
