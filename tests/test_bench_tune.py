"""bench/tune_cifar10_mini.py: the configuration grid validates and rows format, without running anything."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import tune_cifar10_mini as tune  # noqa: E402


def test_grid_validates_and_extra_configs_parse(capsys):
    assert tune.main(["--out", "unused", "--dry-run", "--extra", "x:distance=lpips-own,lr=6e-4,ema=none,batch=64"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == len(tune.GRID) + 1 and "own-kdmf: distance=lpips-own" in out and "operator=factorized" in out
    c = tune.parse_extra("x:distance=lpips-own,lr=6e-4,ema=none,batch=64")
    assert (c.lr, c.ema, c.batch, c.distance) == (6e-4, None, 64, "lpips-own")
    with pytest.raises(ValueError, match="unknown key"):
        tune.parse_extra("x:nope=1")
    model, train = tune.model_and_train(tune.GRID["own"], 1000, 0, "cpu", "runs/pnet")
    assert model.distance == "lpips-own" and train.perceptual_net == "runs/pnet" and train.ema_decay == 0.99
    _, train = tune.model_and_train(tune.GRID["base"], 1000, 0, "cpu", "runs/pnet")
    assert train.perceptual_net is None


def test_markdown_row_has_every_column():
    row = {"name": "own", "config": tune.GRID["own"].settings(), "gpu": "NVIDIA H100", "date": "2026-12-05",
           "distance_name": "lpips-own:pnet-vgg-avgw32-abc", "ema_decay": 0.99, "steps": 1000, "student_seconds": 170.2,
           "fd_ratio": 1.9, "mse": 0.011, "precision_teacher": 0.7, "recall_teacher": 0.5, "precision_student": 0.6,
           "recall_student": 0.4}
    line = tune.markdown_row(row)
    assert line.count("|") == tune.HEADER.splitlines()[0].count("|")
    assert "lpips-own:pnet-vgg-avgw32-abc" in line and "| 1.900 |" in line and "0.600 / 0.400" in line
    assert line.rstrip().endswith("| yes |")
