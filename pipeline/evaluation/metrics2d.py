"""Metrics and plots of the 2-D checkerboard analysis (paper Sec. 6.1 / App. E.6).

All functions take numpy arrays of shape (N, 2) (any float dtype) and return python
floats / ints, numpy arrays, or the path of a written PNG:

* ``in_cell_fraction`` / ``cell_index``: where points land on the checkerboard,
* ``sliced_wasserstein``: sliced Wasserstein-1 distance between two point sets,
* ``outlier_mask`` / ``outlier_rate``: the official KDM outlier analysis
  (DBSCAN noise points united with |z-score| outliers),
* ``pair_mse``: mean squared error between paired samples,
* ``plot_samples`` / ``plot_noise_structure``: student-vs-teacher scatter and the
  noise-to-cell structure figure (paper Fig. 2 / 13),
* ``plot_frontier``: SWD, in-cell fraction and outlier rate against NFE (student, teacher cut short,
  the full teacher as the floor),
* ``checkerboard_metrics``: the summary dict reported per run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.cluster import DBSCAN  # noqa: E402

from models.checkerboard import in_cell  # noqa: E402
from pipeline.evaluation.paired import pair_errors, standard_error  # noqa: E402,F401  (re-exported)

_SWD_CHUNK = 64  # directions projected at once (bounds memory to N * 64 floats per set)
# categorical cell colours: tab20 without its two greys (grey marks off-board points), dark shades first
_CELL_COLORS = plt.get_cmap("tab20")([0, 2, 4, 6, 8, 10, 12, 16, 18, 1, 3, 5, 7, 9, 11, 13, 17, 19])
_OFF_BOARD = (0.6, 0.6, 0.6, 1.0)


def _points(x: np.ndarray, name: str = "x") -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (N, d), got {x.shape}")
    return x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float64)


def in_cell_fraction(x: np.ndarray, low: float = -2.0, high: float = 2.0, scale: float = 0.45) -> float:
    """Fraction of points that lie in a filled cell of the board."""
    x = _points(x)
    if len(x) == 0:
        return float("nan")
    return float(in_cell(torch.from_numpy(np.ascontiguousarray(x)), low, high, scale).double().mean())


def cell_index(x: np.ndarray, low: float = -2.0, high: float = 2.0, scale: float = 0.45) -> np.ndarray:
    """Board cell of each point, -1 for points off the board.

    With ``i = floor(x1 * scale) - low`` and ``j = floor(x2 * scale) - low`` (both in
    ``0..cells-1``), the index is ``i * cells + j`` (row-major over ``(i, j)``).
    """
    x = _points(x)
    cells = int(round(high - low))
    u = x * scale
    on_board = (u >= low).all(axis=1) & (u < high).all(axis=1)
    ij = np.floor(u).astype(np.int64) - int(np.floor(low))
    idx = np.full(len(x), -1, dtype=np.int64)
    idx[on_board] = ij[on_board, 0] * cells + ij[on_board, 1]
    return idx


def _quantile_rows(s: np.ndarray, m: int) -> np.ndarray:
    """Rows of sorted samples ``s`` (n, P) at the inverse-CDF quantiles of levels (k + 0.5) / m."""
    n = len(s)
    if n == m:
        return s
    k = np.arange(m)
    rows = ((2 * k + 1) * n + 2 * m - 1) // (2 * m) - 1  # ceil((k + 0.5) * n / m) - 1, exact
    return s[rows]


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, projections: int = 512, seed: int = 0) -> float:
    """Sliced Wasserstein-1 distance between the empirical distributions of ``a`` and ``b``.

    Directions are ``projections`` standard-normal draws of ``np.random.default_rng(seed)``,
    normalised to unit length. Per direction, W1 between the two projected samples is the
    mean absolute difference of their quantile functions on the common grid of
    ``m = max(len(a), len(b))`` levels ``(k + 0.5) / m`` (inverse-CDF quantiles); for
    equal sizes this is exactly the mean absolute difference of the sorted projections.
    Returns the mean over directions.
    """
    a = _points(a, "a").astype(np.float64)
    b = _points(b, "b").astype(np.float64)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"dimension mismatch: a {a.shape} vs b {b.shape}")
    if len(a) == 0 or len(b) == 0:
        raise ValueError(f"empty point set: a {a.shape}, b {b.shape}")
    dirs = np.random.default_rng(seed).standard_normal((projections, a.shape[1]))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    m = max(len(a), len(b))
    per_dir = []
    for start in range(0, projections, _SWD_CHUNK):
        d = dirs[start:start + _SWD_CHUNK].T
        qa = _quantile_rows(np.sort(a @ d, axis=0), m)
        qb = _quantile_rows(np.sort(b @ d, axis=0), m)
        per_dir.append(np.abs(qa - qb).mean(axis=0))
    return float(np.concatenate(per_dir).mean())


def outlier_mask(x: np.ndarray, eps: float = 0.15, min_samples: int = 5, z: float = 3.0) -> np.ndarray:
    """Official KDM outliers: DBSCAN noise (label -1) OR |z-score| > z on any coordinate.

    z-scores use the mean and population std (ddof=0) of the sample set itself; a
    coordinate with zero spread has z-score 0.
    """
    x = _points(x).astype(np.float64)
    if len(x) == 0:
        return np.zeros(0, dtype=bool)
    noise = DBSCAN(eps=eps, min_samples=min_samples).fit_predict(x) == -1
    std = x.std(axis=0)
    zs = np.divide(x - x.mean(axis=0), std, out=np.zeros_like(x), where=std > 0)
    return noise | (np.abs(zs) > z).any(axis=1)


def outlier_rate(x: np.ndarray, eps: float = 0.15, min_samples: int = 5, z: float = 3.0) -> float:
    """Fraction of points flagged by ``outlier_mask``."""
    mask = outlier_mask(x, eps=eps, min_samples=min_samples, z=z)
    return float(mask.mean()) if len(mask) else float("nan")


def pair_mse(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean over all elements of ``(pred - target) ** 2``."""
    return float(np.mean(pair_errors(pred, target)))


def pair_mse_stderr(pred: np.ndarray, target: np.ndarray) -> Optional[float]:
    """The standard error of ``pair_mse`` over the pairs (``paired.standard_error`` of ``pair_errors``)."""
    return standard_error(pair_errors(pred, target))


# ----------------------------------------------------------------------------- plots

def _limits(*sets: np.ndarray, pad: float = 0.05) -> tuple[float, float]:
    pts = np.concatenate([np.asarray(s, dtype=np.float64).reshape(-1) for s in sets])
    lo, hi = float(pts.min()), float(pts.max())
    margin = pad * (hi - lo) or 1.0
    return lo - margin, hi + margin


def _save(fig, path) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def _scatter(ax, x: np.ndarray, outliers: np.ndarray, colors="tab:blue") -> None:
    ax.scatter(x[~outliers, 0], x[~outliers, 1], s=2, alpha=0.5, c=colors, linewidths=0)
    if outliers.any():
        ax.scatter(x[outliers, 0], x[outliers, 1], s=14, c="red", marker="x", linewidths=0.8,
                   label=f"outliers ({int(outliers.sum())})")
        ax.legend(loc="upper right", fontsize=7)
    ax.set_aspect("equal")


def plot_samples(student_x0: np.ndarray, teacher_x0: np.ndarray, path, title: str = "",
                 student_label: str = "student (1 step)") -> str:
    """Side-by-side scatter of student samples and teacher samples; outliers as red 'x'."""
    student_x0, teacher_x0 = _points(student_x0, "student_x0"), _points(teacher_x0, "teacher_x0")
    lim = _limits(student_x0, teacher_x0)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.5))
    for ax, x, name in zip(axes, (student_x0, teacher_x0), (student_label, "teacher")):
        _scatter(ax, x, outlier_mask(x))
        ax.set(xlim=lim, ylim=lim, title=name)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_noise_structure(x_T: np.ndarray, x_0: np.ndarray, path, title: str = "") -> str:
    """Paper Fig. 2 / 13: x_0 coloured by its board cell (left) and each noise x_T coloured
    by the cell its x_0 lands in (right); off-board points grey, x_0 outliers as red 'x'."""
    x_T, x_0 = _points(x_T, "x_T"), _points(x_0, "x_0")
    if x_T.shape != x_0.shape:
        raise ValueError(f"shape mismatch: x_T {x_T.shape} vs x_0 {x_0.shape}")
    idx = cell_index(x_0)
    colors = _CELL_COLORS[np.mod(idx, len(_CELL_COLORS))]
    colors[idx < 0] = _OFF_BOARD
    outliers = outlier_mask(x_0)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.5))
    for ax, x, name in zip(axes, (x_0, x_T), ("x_0 by cell", "x_T by cell of its x_0")):
        _scatter(ax, x, outliers, colors=colors[~outliers])
        lim = _limits(x)
        ax.set(xlim=lim, ylim=lim, title=name)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_frontier(points, teacher, path, teacher_nfe: int | None = None, title: str = "") -> str:
    """Quality against NFE: SWD, in-cell fraction and outlier rate (one panel each, ``frontier_plot``) of the
    student at each NFE and of the teacher's sampler cut short (``points``: objects with ``model``, ``nfe`` and
    ``metrics`` = a MetricSet, e.g. storage_schemas FrontierPoint), with the full teacher's x_0 (``teacher``,
    a MetricSet) as a dashed floor line (at ``teacher_nfe`` as a marker when known); SWD on a log axis when
    its values span 10x."""
    from pipeline.evaluation.frontier_plot import FrontierPanel
    from pipeline.evaluation.frontier_plot import plot_frontier as draw
    panels = [FrontierPanel(label, {(p.model, p.nfe): getattr(p.metrics, key) for p in points},
                            None if teacher is None else getattr(teacher, key), log=key == "swd")
              for key, label in (("swd", "SWD to the held-out reference (lower is better)"),
                                 ("in_cell_fraction", "in-cell fraction (higher is better)"),
                                 ("outlier_rate", "outlier rate (lower is better)"))]
    return draw(panels, path, teacher_nfe, title, floor_label="teacher x_0")


# ----------------------------------------------------------------------------- summary

def checkerboard_metrics(samples: np.ndarray, reference: np.ndarray, *, swd_projections: int = 512,
                         swd_seed: int = 0, eps: float = 0.15, min_samples: int = 5, z: float = 3.0,
                         low: float = -2.0, high: float = 2.0, scale: float = 0.45) -> dict:
    """In-cell fraction, SWD to ``reference``, outlier rate and size of ``samples``."""
    samples = _points(samples, "samples")
    return {
        "in_cell_fraction": in_cell_fraction(samples, low, high, scale),
        "swd": sliced_wasserstein(samples, reference, projections=swd_projections, seed=swd_seed),
        "outlier_rate": outlier_rate(samples, eps=eps, min_samples=min_samples, z=z),
        "num_points": int(len(samples)),
    }
