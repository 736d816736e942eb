"""bench/checkerboard_pair_errors.py: per-pair errors, the worst 1 %'s share, cell flips and overlaps (synthetic)."""
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import checkerboard_pair_errors as pe  # noqa: E402
from pipeline.evaluation.metrics2d import pair_errors  # noqa: E402
from storage_schemas import CheckerboardSpec  # noqa: E402


def test_summary_splits_the_worst_pairs_from_the_rest():
    board = CheckerboardSpec()
    rng = np.random.default_rng(0)
    target = rng.uniform(-1.0, 1.0, (1000, 2)).astype(np.float32)   # all inside cells of the board
    pred = target + 0.001                                          # per pair (1e-3)^2 = 1e-6
    # five pairs far off: moved one cell over (a cell is 1 / scale wide); the worst 1 % (ten pairs) holds them and
    # five ordinary pairs
    pred[:5, 0] += 1.0 / board.scale
    err = pair_errors(pred, target)
    assert err.shape == (1000,) and err[500] == pytest.approx(1e-6, rel=1e-3)
    s = pe.summary(err, pred, target, board)
    assert s["worst_count"] == 10 and set(range(5)) <= set(s["worst"])
    assert s["pair_mse"] == pytest.approx(err.mean()) and s["median"] == pytest.approx(1e-6, rel=1e-3)
    big = (1.0 / board.scale) ** 2 / 2
    assert s["worst_share"] == pytest.approx(5 * big / (5 * big + 995e-6), rel=1e-3)
    assert s["mse_without_worst"] == pytest.approx(1e-6, rel=1e-3)
    assert s["worst_cell_flips"] == 5                  # the other five of the worst ten stay in their cell
    assert s["stderr"] == pytest.approx(err.std(ddof=1) / np.sqrt(1000))
    import torch
    from models.checkerboard import in_cell
    off = ~in_cell(torch.from_numpy(target[s["worst"]]), board.low, board.high, board.scale).numpy()
    assert s["worst_teacher_off_cells"] == int(off.sum()) and 0 < off.sum() < 10   # uniform targets: some in gaps
    on = in_cell(torch.from_numpy(target), board.low, board.high, board.scale).numpy()
    assert s["teacher_in_cells"] == int(on.sum()) and s["mse_teacher_in_cells"] == pytest.approx(err[on].mean())


def test_overlaps_count_common_worst_pairs():
    assert pe.overlaps({"a": [1, 2, 3], "b": [3, 4], "c": [1, 3]}) == {"a & b": 1, "a & c": 2, "b & c": 1}
    assert pe.overlaps({"a": [1]}) == {}


def test_paired_differences():
    a, b = np.array([1.0, 2.0, 3.0, 6.0]), np.array([1.0, 1.0, 1.0, 1.0])
    d = pe.differences({"a": a, "b": b}, np.array([True, True, False, True]))
    assert d["a - b"]["all"]["mean"] == pytest.approx(2.0)
    assert d["a - b"]["all"]["stderr"] == pytest.approx(np.std([0, 1, 2, 5], ddof=1) / 2)
    assert d["a - b"]["teacher_in_cells"]["mean"] == pytest.approx(2.0)      # (0 + 1 + 5) / 3
