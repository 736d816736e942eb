#!/usr/bin/env python
"""Build-to-build spread of one checkerboard student setting: the held-out protocol's metrics of every build (rows of
``bench/sweep_checkerboard_import.py`` at one step count), their mean and standard error over builds, and how many
builds meet each goal (issue 23: in-cell >= 0.963, outliers <= 0.5 %, held-out pair MSE <= 5e-4; the official KDM
model on the same protocol: 0.9632 / 0.0441 / 0.71 % / 3.96e-4).

    python bench/checkerboard_build_spread.py --step 24000 --out DIR ROWS.jsonl [ROWS.jsonl ...]
Writes DIR/spread.md and DIR/spread.json.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

GOALS = {"incell": (">=", 0.963), "outliers": ("<=", 0.005), "mse": ("<=", 5e-4)}
OFFICIAL = {"incell": 0.9632, "swd": 0.0441, "outliers": 0.0071, "mse": 3.96e-4}


def spread(rows: list[dict]) -> dict:
    out = {}
    for key in ("incell", "swd", "outliers", "mse"):
        vals = [float(r[key]) for r in rows]
        mean = sum(vals) / len(vals)
        se = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) / len(vals)) if len(vals) > 1 else None
        entry = {"mean": mean, "stderr": se, "min": min(vals), "max": max(vals), "official": OFFICIAL[key]}
        if key in GOALS:
            op, bound = GOALS[key]
            entry["goal"] = f"{op} {bound}"
            entry["builds_meeting"] = sum((v >= bound) if op == ">=" else (v <= bound) for v in vals)
        out[key] = entry
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rows", nargs="+")
    p.add_argument("--step", type=int, default=24000, help="the milestone of each build to take")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    rows = []
    for f in a.rows:
        got = [json.loads(line) for line in open(f) if line.strip()]
        got = [r for r in got if r["step"] == a.step]
        if not got:
            raise SystemExit(f"{f}: no row at step {a.step}")
        rows.append({**got[-1], "file": f})
    rows.sort(key=lambda r: r["seed"])
    s = spread(rows)
    lines = [f"| seed | in-cell | SWD | outliers | held-out pair MSE (± s.e. over pairs) | train s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        se = f" ± {r['mse_stderr']:.1e}" if "mse_stderr" in r else ""
        lines.append(f"| {r['seed']} | {r['incell']:.4f} | {r['swd']:.4f} | {100 * r['outliers']:.2f} % | "
                     f"{r['mse']:.2e}{se} | {r['train_secs']:.0f} |")
    n = len(rows)
    fmt = {"incell": "{:.4f}", "swd": "{:.5f}", "outliers": "{:.4f}", "mse": "{:.2e}"}
    cells = []
    for key in ("incell", "swd", "outliers", "mse"):
        e, f = s[key], fmt[key]
        cell = f"{f.format(e['mean'])} ± {f.format(e['stderr'])}" if e["stderr"] is not None else f.format(e["mean"])
        if "builds_meeting" in e:
            cell += f" ({e['builds_meeting']} of {n} {e['goal']})"
        cells.append(cell)
    lines.append(f"| **mean ± s.e. over {n} builds** | " + " | ".join(cells) + " | |")
    lines.append("| official KDM model | " + " | ".join(fmt[k].format(OFFICIAL[k]) for k in OFFICIAL) + " | |")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spread.md").write_text("\n".join(lines) + "\n")
    (out / "spread.json").write_text(json.dumps({"step": a.step, "builds": rows, "spread": s}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
