"""bench/student_steps.py: rows are the recipe's own config with the steps, the presets' EMA rule and a variant."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import student_steps  # noqa: E402


def test_variant_parsing():
    assert student_steps.parse_variant("late:model.adv_weight=0.005,model.adv_start=0.5") == (
        "late", {"student.model.adv_weight": "0.005", "student.model.adv_start": "0.5"})
    assert student_steps.parse_variant("preset") == ("preset", {})
    # list values keep their commas: the multi-step student's NFEs
    assert student_steps.parse_variant("ms:model.nfe_train=[1,2,4],model.trajectory_rows=64") == (
        "ms", {"student.model.nfe_train": "[1,2,4]", "student.model.trajectory_rows": "64"})
    cfg = student_steps.row_config("mini", False, "/r", 1000, {"student.model.nfe_train": "[1,2,4]"},
                                   ["pairs.sampler.snapshot_steps=[5,9,14]", "evaluation.teacher_nfe=[3,5]"])
    assert (cfg.student.model.nfe_train, cfg.pairs.sampler.snapshot_steps, cfg.evaluation.teacher_nfe) == (
        (1, 2, 4), (5, 9, 14), (3, 5))
    with pytest.raises(ValueError, match="expected NAME:key=value"):
        student_steps.parse_variant("x:model.adv_weight")


def test_row_config_is_the_preset_with_steps_ema_and_variant():
    from storage_schemas.distill_image import distill_image_preset
    cfg = student_steps.row_config("mini", False, "/r", 1000, {"student.model.adv_weight": "0.005",
                                                                  "student.model.adv_start": "0.5"},
                                   ["dataset.archive=/d/c.tgz"])
    mini = distill_image_preset("mini")
    assert cfg.root == "/r" and cfg.dataset.archive == "/d/c.tgz"
    assert (cfg.student.train.steps, cfg.student.train.ema_decay) == (1000, 0.99)     # 1 - 10 / steps
    assert (cfg.student.model.adv_weight, cfg.student.model.adv_start) == (0.005, 0.5)
    # everything else, the fixed stages' sections included, is the preset's: their artifacts are found again
    for section in ("teacher", "pairs", "filter", "extractor", "perceptual", "evaluation"):
        assert getattr(cfg, section) == getattr(mini, section), section
    assert cfg.student.model.distance == "lpips-own"
    # the preset's own step count gives the preset's own student (same EMA): a deployment run's student is found
    same = student_steps.row_config("mini", False, "/r", mini.student.train.steps, {})
    assert same.student.train.ema_decay == mini.student.train.ema_decay


def test_markdown_row_and_plot(tmp_path):
    rows = [{"variant": v, "steps": n, "date": "2026-12-07", "gpu": "NVIDIA H100", "train_seconds": 10.0 * n,
             "fd_ratio": 1.5 - n / 10000, "mse": 0.02, "precision_teacher": 0.7, "recall_teacher": 0.5,
             "precision_student": 0.75, "recall_student": 0.02 if v == "d" else 0.45, "collapsed": v == "d"}
            for v in ("preset", "d") for n in (300, 1000)]
    line = student_steps.markdown_row(rows[1])
    assert line.count("|") == student_steps.HEADER.splitlines()[0].count("|")
    assert "| 1000 | 10000 | 1.400 | 0.0200 | 0.700 / 0.500 | 0.750 / 0.450 | no |" in line
    assert student_steps.markdown_row(rows[3]).endswith("| yes |")
    student_steps.plot(rows, tmp_path / "steps.png")
    assert (tmp_path / "steps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dry_run_prints_each_row(capsys):
    assert student_steps.main(["--root", "/r", "--out", "unused", "--steps", "300,1000", "--dry-run",
                               "--variant", "late:model.adv_weight=0.005,model.adv_start=0.5,model.adv_rampup=0.2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["late steps=300: distance=lpips-own adv_weight=0.005 adv_start=0.5 adv_rampup=0.2 ema=0.966667 "
                   "precision=bf16",
                   "late steps=1000: distance=lpips-own adv_weight=0.005 adv_start=0.5 adv_rampup=0.2 ema=0.99 "
                   "precision=bf16"]
    assert not Path("unused").exists()
