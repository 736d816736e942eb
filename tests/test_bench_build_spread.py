"""bench/checkerboard_build_spread.py: one row per build at the asked step, the mean and standard error over builds,
and how many builds meet each goal of issue 23."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import checkerboard_build_spread as bs  # noqa: E402


def row(seed, step, mse, incell=0.966, outliers=0.004):
    return {"seed": seed, "step": step, "incell": incell, "swd": 0.0448, "outliers": outliers, "mse": mse,
            "train_secs": 900.0}


def test_spread_over_builds(tmp_path):
    files = []
    for seed, mse, outl in ((0, 4e-4, 0.004), (1, 6e-4, 0.006), (2, 5e-4, 0.005)):
        f = tmp_path / f"s{seed}.jsonl"
        rows = (row(seed, 16000, 9e-4), row(seed, 24000, mse, outliers=outl))
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files.append(str(f))
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(REPO / "bench" / "checkerboard_build_spread.py"), "--out", str(out), *files],
                   check=True, capture_output=True)
    s = json.loads((out / "spread.json").read_text())
    assert [b["seed"] for b in s["builds"]] == [0, 1, 2] and all(b["step"] == 24000 for b in s["builds"])
    mse = s["spread"]["mse"]
    assert math.isclose(mse["mean"], 5e-4) and math.isclose(mse["stderr"], 1e-4 / math.sqrt(3))
    assert mse["builds_meeting"] == 2 and mse["goal"] == "<= 0.0005"         # 5e-4 itself meets "<="
    assert s["spread"]["outliers"]["builds_meeting"] == 2 and s["spread"]["incell"]["builds_meeting"] == 3
    assert "| **mean ± s.e. over 3 builds** |" in (out / "spread.md").read_text()
    missing = subprocess.run([sys.executable, str(REPO / "bench" / "checkerboard_build_spread.py"), "--step", "8000",
                              "--out", str(out), files[0]], capture_output=True, text=True)
    assert missing.returncode != 0 and "no row at step 8000" in missing.stderr


def test_spread_of_one_build_has_no_stderr():
    assert bs.spread([row(0, 24000, 4e-4)])["mse"]["stderr"] is None
