"""Where the held-out pair MSE of a checkerboard student comes from, and whether two models miss the same pairs.

The held-out pair MSE (storage_schemas.Eval2DConfig: the first n = 10,000 held-out pairs, student(x_T) against
the teacher's x_0) is a mean over pairs whose errors are far from alike: where the teacher's flow sends
neighbouring noise to different cells, a smooth student map cuts the boundary elsewhere and lands a few pairs
in the wrong cell, an error of order one against 1e-5 for a typical pair. This script gives, per model:

* the pair MSE, its standard error over the held-out pairs, the median pair's error;
* the share of the summed error carried by the worst 1 % of pairs, and the pair MSE without them;
* how many of the worst 1 % end in another cell of the board than the teacher's x_0 (cell flips), and for how
  many the teacher's own x_0 lies off the board's cells;
* the pair MSE over the pairs whose teacher x_0 lies in a cell (the teacher's own off-cell samples left out);
* for every two models, the overlap of their worst 1 % (how many pairs both miss) and the pair MSE difference,
  paired over the same pairs, with its standard error (all pairs; those with the teacher's x_0 in a cell);

and a plot (``pair-errors.png``): per model, the held-out x_T (left) and x_0 (right) with the worst 1 % marked,
each worst pair's x_0 joined to the model's output.

    python bench/checkerboard_pair_errors.py --pairs ROOT/pairs/filtered-... --student A.pt --student ROOT/students/kdm-... \\
        [--official-code KDM_CHECKOUT --official-model KDM_CHECKOUT/experiments/checkerboard/model.pt] --out OUTDIR

Models: committed 2-D students or a sweep's saved EMA weights (bench/sweep_checkerboard_import.py --save), and
optionally the official KDM model (trained on the held-out trajectories too: its errors there are not held out).
Writes OUTDIR/pair-errors.json, .md and .png.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from checkerboard_official_model import DrawProtocol, load_any_student, load_official, write_outputs  # noqa: E402
from pipeline.evaluation.paired import pair_errors, standard_error  # noqa: E402


def in_cells(points: np.ndarray, board) -> np.ndarray:
    """Whether each point lies in a filled cell of the board."""
    import torch
    from models.checkerboard import in_cell
    return in_cell(torch.from_numpy(np.ascontiguousarray(points, np.float32)), board.low, board.high,
                   board.scale).numpy()


def summary(err: np.ndarray, pred: np.ndarray, target: np.ndarray, board, share: float = 0.01,
            on: np.ndarray | None = None) -> dict:
    """``on``: ``in_cells(target, board)`` when the caller has it already."""
    from pipeline.evaluation.metrics2d import cell_index
    k = max(1, int(round(share * len(err))))
    worst = np.argsort(err)[::-1][:k]
    cells = [cell_index(x[worst], board.low, board.high, board.scale) for x in (pred, target)]
    flips = cells[0] != cells[1]
    on = in_cells(target, board) if on is None else on
    teacher_off = ~on[worst]
    rest = np.ones(len(err), bool)
    rest[worst] = False
    return {"pair_mse": float(err.mean()), "stderr": standard_error(err),
            "median": float(np.median(err)), "worst_share": float(err[worst].sum() / max(err.sum(), 1e-300)),
            "mse_without_worst": float(err[rest].mean()), "worst_cell_flips": int(flips.sum()), "worst_count": k,
            "worst_teacher_off_cells": int(teacher_off.sum()),
            # the pairs whose teacher x_0 lies in a cell (the teacher's own off-cell samples left out)
            "mse_teacher_in_cells": float(err[on].mean()),
            "stderr_teacher_in_cells": standard_error(err[on]),
            "teacher_in_cells": int(on.sum()),
            "worst": [int(i) for i in worst]}


def overlaps(worst: dict[str, list[int]]) -> dict[str, int]:
    names = list(worst)
    return {f"{a} & {b}": len(set(worst[a]) & set(worst[b])) for i, a in enumerate(names) for b in names[i + 1:]}


def differences(errors: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, dict]:
    """Per two models a, b: the pair MSE difference a - b, paired over the same pairs (mean ± standard error), on
    all pairs and on those where ``mask`` holds (the teacher's x_0 in a cell)."""
    out, names = {}, list(errors)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            d = errors[a] - errors[b]
            out[f"{a} - {b}"] = {w: {"mean": float(v.mean()), "stderr": standard_error(v)}
                                 for w, v in (("all", d), ("teacher_in_cells", d[mask]))}
    return out


def markdown(res: dict) -> str:
    k = next(iter(res["models"].values()))["worst_count"]
    lines = [f"Held-out pairs: n = {res['n']} (`{res['pairs']}`), {res['date']}. Errors per pair averaged over the two "
             f"coordinates; 'worst' = the {k} pairs (1 %) with the largest error.", "",
             "| model | pair MSE (± stderr) | median pair | worst 1 % share | MSE without the worst 1 % | worst in another cell "
             "| worst whose teacher x_0 is off the cells | pair MSE where the teacher's x_0 is in a cell |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in res["models"].items():
        lines.append(f"| {name} | {m['pair_mse']:.3g} ± {m['stderr']:.2g} | {m['median']:.2g} | {m['worst_share']:.1%} | "
                     f"{m['mse_without_worst']:.3g} | {m['worst_cell_flips']} of {m['worst_count']} | "
                     f"{m['worst_teacher_off_cells']} of {m['worst_count']} | {m['mse_teacher_in_cells']:.3g} ± "
                     f"{m['stderr_teacher_in_cells']:.2g} (n = {m['teacher_in_cells']}) |")
    if res["overlaps"]:
        lines += ["", "Pairs in both models' worst 1 %: " + "; ".join(f"{a}: {v}" for a, v in res["overlaps"].items())]
        lines += ["", "Pair MSE differences, paired over the same pairs (mean ± stderr): " + "; ".join(
            f"{k}: {v['all']['mean']:+.3g} ± {v['all']['stderr']:.2g} (all), {v['teacher_in_cells']['mean']:+.3g} ± "
            f"{v['teacher_in_cells']['stderr']:.2g} (teacher x_0 in a cell)" for k, v in res["differences"].items())]
    return "\n".join(lines)


def plot(path: Path, proto: DrawProtocol, preds: dict[str, np.ndarray], res: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(preds)
    fig, axes = plt.subplots(len(names), 2, figsize=(9, 4.4 * len(names)), squeeze=False)
    x_T, x_0 = proto.held_xT, proto.reference
    for row, name in enumerate(names):
        worst = np.asarray(res["models"][name]["worst"])
        a, b = axes[row]
        a.scatter(x_T[:, 0], x_T[:, 1], s=0.3, c="0.75", rasterized=True)
        a.scatter(x_T[worst, 0], x_T[worst, 1], s=6, c="tab:red")
        a.set_title(f"{name}\nx_T of the worst 1 %", fontsize=9)
        b.scatter(x_0[:, 0], x_0[:, 1], s=0.3, c="0.75", rasterized=True)
        p = preds[name][worst]
        for i, j in enumerate(worst):
            b.plot([x_0[j, 0], p[i, 0]], [x_0[j, 1], p[i, 1]], c="tab:red", lw=0.5)
        b.scatter(p[:, 0], p[:, 1], s=6, c="tab:red", label="model output")
        b.scatter(x_0[worst, 0], x_0[worst, 1], s=6, c="k", label="teacher x_0")
        b.set_title(f"{name} (pair MSE {res['models'][name]['pair_mse']:.3g})\nteacher x_0 -> output, worst 1 %",
                    fontsize=9)
        b.legend(fontsize=7, loc="upper right")
        for ax in (a, b):
            ax.set_aspect("equal")
            ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", required=True, help="the filtered pair store (with its held-out split)")
    ap.add_argument("--student", action="append", default=[], metavar="SPEC",
                    help="a committed 2-D student or a sweep's .pt (repeatable); NAME=SPEC names it in the report")
    ap.add_argument("--official-code", help="root of an azencot-group/KDM checkout (with --official-model)")
    ap.add_argument("--official-model", help="its experiments/checkerboard/model.pt")
    ap.add_argument("--out", required=True, help="directory for pair-errors.json / .md / .png")
    a = ap.parse_args(argv)
    if not a.student and not a.official_model:
        ap.error("give at least one --student or --official-model")
    if bool(a.official_code) != bool(a.official_model):
        ap.error("--official-code and --official-model go together")
    import torch
    from pipeline.evaluation.sample import generate
    proto = DrawProtocol(a.pairs)
    preds: dict[str, np.ndarray] = {}
    for spec in a.student:
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        model, _, label = load_any_student(path)
        with torch.no_grad():
            preds[name or label] = generate(model, proto.held_xT)
    if a.official_model:
        preds["official KDM model"] = load_official(a.official_code, a.official_model)(proto.held_xT)
    b = proto.board
    errors = {name: pair_errors(p, proto.reference) for name, p in preds.items()}
    on = in_cells(proto.reference, b)
    models = {name: summary(errors[name], p, proto.reference, b, on=on) for name, p in preds.items()}
    res = {"pairs": a.pairs, "n": proto.n, "date": datetime.now(timezone.utc).date().isoformat(), "models": models,
           "overlaps": overlaps({k: v["worst"] for k, v in models.items()}), "differences": differences(errors, on)}
    md = markdown(res)
    write_outputs(a.out, "pair-errors", res, md)
    plot(Path(a.out) / "pair-errors.png", proto, preds, res)
    print(md)
    return res


if __name__ == "__main__":
    main()
