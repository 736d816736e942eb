import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root, when run as plain `pytest`

from models.checkerboard import in_cell, sample_checkerboard  # noqa: E402
from shared_data import require, shared_data  # noqa: E402
from pipeline.evaluation.metrics2d import (  # noqa: E402
    cell_index,
    checkerboard_metrics,
    in_cell_fraction,
    outlier_mask,
    outlier_rate,
    pair_mse,
    plot_noise_structure,
    plot_samples,
    sliced_wasserstein,
)

SHARED = shared_data("checkerboard-fm-trajectories.npy")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
S = 0.45


def board(n=20000, seed=0):
    return sample_checkerboard(n, generator=torch.Generator().manual_seed(seed)).numpy()


def grid_blob():
    """41 x 41 regular grid with spacing 0.1 on [-2, 2]^2: one DBSCAN cluster, no |z| > 3."""
    g = np.linspace(-2.0, 2.0, 41)
    return np.stack(np.meshgrid(g, g), axis=-1).reshape(-1, 2)


@pytest.fixture(scope="module")
def shared_x0():
    require(SHARED)
    traj = np.load(SHARED, mmap_mode="r")
    return np.array(traj[-1, :10000]), np.array(traj[0, :10000])


# ----------------------------------------------------------------------------- cells

def test_in_cell_fraction_of_true_samples_is_one():
    assert in_cell_fraction(board()) == 1.0


def test_in_cell_fraction_of_hand_built_points():
    # board coords (before dividing by 0.45): filled iff floor(u1) + floor(u2) is even and on board
    u = np.array([
        [0.5, 0.5],    # (0, 0) filled
        [-1.5, -1.5],  # (-2, -2) filled
        [1.5, 0.5],    # (1, 0) empty
        [-0.5, 0.5],   # (-1, 0) empty
        [2.5, 0.5],    # off board
    ])
    assert in_cell_fraction(u / S) == pytest.approx(2 / 5)
    assert isinstance(in_cell_fraction(u / S), float)


def test_cell_index_of_hand_chosen_points():
    u = np.array([
        [-1.5, -1.5],  # i=0, j=0
        [-1.5, 1.5],   # i=0, j=3
        [1.5, -1.5],   # i=3, j=0
        [0.5, -0.5],   # i=2, j=1
        [1.9, 1.9],    # i=3, j=3
        [2.1, 0.0],    # off board
        [0.0, -2.1],   # off board
    ])
    np.testing.assert_array_equal(cell_index(u / S), [0, 3, 12, 9, 15, -1, -1])


def test_cell_index_parity_matches_in_cell():
    x = np.random.default_rng(0).uniform(-5.5, 5.5, size=(5000, 2)).astype(np.float32)
    idx = cell_index(x)
    filled = (idx >= 0) & ((idx // 4 + idx % 4) % 2 == 0)
    np.testing.assert_array_equal(filled, in_cell(torch.from_numpy(x)).numpy())
    assert set(np.unique(cell_index(board(4000)))) == {0, 2, 5, 7, 8, 10, 13, 15}


# ----------------------------------------------------------------------------- SWD

def test_swd_zero_on_identical_sets():
    a = board(3000)
    assert sliced_wasserstein(a, a) == 0.0
    assert sliced_wasserstein(a, a[::-1].copy()) == 0.0  # order does not matter


def test_swd_shift_equals_mean_abs_projected_shift():
    a = board(2000)
    c = 0.7
    dirs = np.random.default_rng(3).standard_normal((256, 2))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    expected = np.mean(np.abs(c * dirs[:, 0]))
    got = sliced_wasserstein(a, a + np.array([c, 0.0]), projections=256, seed=3)
    assert got == pytest.approx(expected, rel=1e-9)
    # and E|cos| = 2 / pi for uniform directions
    assert got == pytest.approx(c * 2 / np.pi, rel=0.05)


def test_swd_symmetric_deterministic_and_seed_dependent():
    a, b = board(1500, seed=1), np.random.default_rng(1).standard_normal((1500, 2))
    d = sliced_wasserstein(a, b, projections=128, seed=7)
    assert d > 0.1
    assert sliced_wasserstein(b, a, projections=128, seed=7) == pytest.approx(d, rel=1e-12)
    assert sliced_wasserstein(a, b, projections=128, seed=7) == d
    assert sliced_wasserstein(a, b, projections=128, seed=8) != d


def test_swd_matches_exact_1d_wasserstein():
    from scipy.stats import wasserstein_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 800), rng.normal(0.5, 2, 800)
    # in 1-D every direction is +-1, so SWD is W1 itself
    assert sliced_wasserstein(a[:, None], b[:, None], projections=8) == pytest.approx(
        wasserstein_distance(a, b), rel=1e-10)
    # unequal sizes: quantile grid of max(n, m) levels approximates W1 closely
    c = rng.normal(0.5, 2, 1900)
    assert sliced_wasserstein(a[:, None], c[:, None], projections=8) == pytest.approx(
        wasserstein_distance(a, c), abs=0.01)


def test_swd_unequal_sizes_duplicated_set_is_zero():
    a = board(1000)
    assert sliced_wasserstein(a, np.concatenate([a, a]), projections=64) == pytest.approx(0.0, abs=1e-12)
    # an independent sample of the same board is much closer than a Gaussian of similar spread
    same = sliced_wasserstein(a, board(3000, seed=5), projections=64)
    other = sliced_wasserstein(a, 2.0 * np.random.default_rng(0).standard_normal((3000, 2)), projections=64)
    assert same < 0.2 < 0.5 < other


# ----------------------------------------------------------------------------- outliers

def test_outlier_mask_flags_far_point_and_small_cluster_only():
    blob = grid_blob()
    small = np.array([[3.0, 3.0], [3.01, 3.0], [3.0, 3.01]])  # 3 < min_samples points, |z| < 3
    x = np.concatenate([blob, small])
    mask = outlier_mask(x)
    assert not mask[:len(blob)].any()
    assert mask[len(blob):].all()

    far = np.concatenate([blob, [[10.0, 10.0]]])
    mask = outlier_mask(far)
    assert mask[-1] and not mask[:-1].any()
    assert outlier_rate(far) == pytest.approx(1 / len(far))


def test_outlier_mask_zscore_flags_dense_far_cluster():
    blob = grid_blob()
    far_cluster = np.array([20.0, 0.0]) + 0.01 * np.arange(10)[:, None] * np.array([1.0, 0.0])
    x = np.concatenate([blob, far_cluster])
    mask = outlier_mask(x)
    assert mask[len(blob):].all()      # a DBSCAN cluster of its own, but |z| > 3 on x1
    assert not mask[:len(blob)].any()
    assert not outlier_mask(x, z=100.0).any()


def test_outlier_mask_constant_coordinate_is_not_an_outlier():
    x = np.stack([np.linspace(0, 1, 50), np.zeros(50)], axis=1)
    assert not outlier_mask(x).any()


def test_shared_teacher_samples(shared_x0):
    x0, _ = shared_x0
    assert outlier_rate(x0) < 0.01
    assert in_cell_fraction(x0) > 0.95


# ----------------------------------------------------------------------------- MSE

def test_pair_mse_value_and_shape_error():
    pred = np.array([[1.0, 2.0], [3.0, 4.0]])
    target = np.array([[1.0, 0.0], [0.0, 4.0]])
    assert pair_mse(pred, target) == pytest.approx((0 + 4 + 9 + 0) / 4)
    assert pair_mse(pred, pred) == 0.0
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(3, 2\)"):
        pair_mse(pred, np.zeros((3, 2)))


# ----------------------------------------------------------------------------- summary + plots

def test_checkerboard_metrics_keys_and_values():
    # DBSCAN(eps=0.15) needs a dense sample: at 10k board points no point is isolated
    a, ref = board(10000, seed=2), board(10000, seed=3)
    m = checkerboard_metrics(a, ref, swd_projections=64)
    assert set(m) == {"in_cell_fraction", "swd", "outlier_rate", "num_points"}
    assert m["in_cell_fraction"] == 1.0 and m["num_points"] == 10000
    assert isinstance(m["num_points"], int)
    assert all(isinstance(m[k], float) for k in ("in_cell_fraction", "swd", "outlier_rate"))
    assert m["swd"] == sliced_wasserstein(a, ref, projections=64)
    assert 0.0 < m["swd"] < 0.1
    assert m["outlier_rate"] < 0.01
    # sparse sample: the same board looks outlier-heavy, so compare rates at equal N
    assert checkerboard_metrics(a[:1000], ref, swd_projections=8)["outlier_rate"] > 0.2


def test_plots_write_png(tmp_path):
    x0 = np.concatenate([board(1500), [[9.0, 9.0]]])
    xT = np.random.default_rng(0).standard_normal(x0.shape)
    p1 = plot_samples(x0, board(1500, seed=1), tmp_path / "a" / "samples.png", title="step 100")
    p2 = plot_noise_structure(xT, x0, tmp_path / "b" / "noise.png")
    for p in (p1, p2):
        assert isinstance(p, str)
        data = Path(p).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000
    with pytest.raises(ValueError):
        plot_noise_structure(xT[:10], x0, tmp_path / "bad.png")


def test_plot_noise_structure_on_shared_data(tmp_path, shared_x0):
    x0, xT = shared_x0
    p = plot_noise_structure(xT[:3000], x0[:3000], tmp_path / "fig2.png", title="teacher")
    assert Path(p).read_bytes()[:8] == PNG_MAGIC


def test_pair_errors_and_the_pair_mse_standard_error():
    target = np.zeros((4, 2))
    pred = np.array([[0.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 0.0]])
    from pipeline.evaluation.metrics2d import pair_errors, pair_mse_stderr
    err = pair_errors(pred, target)
    np.testing.assert_allclose(err, [0.0, 2.0, 4.5, 0.0])           # per pair, the mean over its coordinates
    assert pair_mse(pred, target) == pytest.approx(err.mean())
    assert pair_mse_stderr(pred, target) == pytest.approx(np.std(err, ddof=1) / 2.0)
    assert pair_mse_stderr(pred, pred) == 0.0
    with pytest.raises(ValueError, match="shape mismatch"):
        pair_errors(pred, np.zeros((3, 2)))


def test_value_axes_go_logarithmic_only_over_a_wide_range():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.evaluation.frontier_plot import log_scale_if_wide
    fig, (a, b, c) = plt.subplots(1, 3)
    assert log_scale_if_wide(a, [0.0448, 0.0449, 0.0436]) is False and a.get_yscale() == "linear"
    assert log_scale_if_wide(b, [1.99, 0.0689, 0.0443]) is True and b.get_yscale() == "log"
    assert log_scale_if_wide(c, [0.0, None, -1.0]) is False and c.get_yscale() == "linear"
    plt.close(fig)
