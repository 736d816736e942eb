"""The official KDM checkerboard model and a kdm student on one protocol, with the sampling spread of every metric.

The held-out protocol (storage_schemas.Eval2DConfig, RESULTS.md) scores one draw of 10,000 student samples
against 10,000 held-out teacher x_0. Two independent 10,000-point sets of the same distribution differ by
an SWD of 0.03-0.07 on this board, so one draw cannot rank two models whose SWDs differ by 0.01. This script
puts the official model (``experiments/checkerboard/model.pt`` of azencot-group/KDM, loaded with its own
classes) and a kdm student on the same footing:

* draw 0 is the protocol itself (seeds 1,000,000 + [0, n)), so its row equals the student's report;
* draws 1..R-1 use the next disjoint seed ranges; both models map the *same* x_T of every draw, so the
  per-draw difference student - official is paired and its standard error is small;
* the teacher row scores disjoint n-point slices of the train split's x_0 against the same reference: the
  floor a perfect student would reach;
* every draw's SWD also against the whole train split's x_0 (about 40,000 points: a reference with less
  sampling noise of its own than the n held-out x_0; its teacher row is the held-out x_0 against it);
* held-out pair MSE on the n held-out pairs (the official model was trained on all 50,000 trajectories,
  the held-out ones included, so its pair MSE is not held out for it).

    python bench/checkerboard_official_model.py --pairs ROOT/pairs/filtered-... --student ROOT/students/kdm-... \\
        --official-code KDM_CHECKOUT --official-model KDM_CHECKOUT/experiments/checkerboard/model.pt --out OUTDIR

Writes OUTDIR/official-vs-student.json and .md, and prints the table.
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

METRICS = ("in_cell_fraction", "swd", "outlier_rate")
# SWD of the same draws against the whole train split's x_0 (about 40,000 points) instead of the 10,000 held-out
# x_0: a four times larger reference, so less of the score is that reference's own sampling noise. (The official
# model saw the held-out trajectories in training, the kdm students the train split; both saw the train split.)
SWD_TRAIN = "swd_train"


def load_official(code_dir: str, model_path: str):
    """The pickled ``KoopmanDistillModelCheckerBoard`` and its one-step map x_T -> x_0 (as its ``sample``)."""
    import torch
    # Both projects name their package `models`: kdm's is set aside while the pickle imports the official one,
    # then put back (the loaded object keeps its own classes).
    ours = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "models" or k.startswith("models.")}
    code = str(Path(code_dir).resolve())
    sys.path.insert(0, code)
    try:
        model = torch.load(model_path, weights_only=False, map_location="cpu").eval()
    except ModuleNotFoundError as e:
        raise SystemExit(f"--official-code {code_dir} does not hold the official classes ({e}); pass the root of "
                         f"an azencot-group/KDM checkout") from e
    finally:
        sys.path.remove(code)
        for k in [k for k in sys.modules if k == "models" or k.startswith("models.")]:
            del sys.modules[k]
        sys.modules.update(ours)

    @torch.no_grad()
    def one_step(x_T: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(x_T, np.float32))
        T, t = torch.ones(len(x)), torch.zeros(len(x))
        return model.x0_observables_decoder(model.koopman_operator(model.xT_observables_encoder(x, T)), t).numpy()

    return one_step


def load_any_student(spec: str):
    """(model, data dim, version label) of a committed student or of a sweep's saved EMA weights (.pt)."""
    from pipeline.evaluation.sample import load_student
    if not spec.endswith(".pt"):
        student, manifest = load_student(spec)
        return student, manifest.model.dim, manifest.version
    import hashlib
    import torch
    sys.path.insert(0, str(REPO / "bench"))
    from sweep_checkerboard_import import build
    ck = torch.load(spec, map_location="cpu", weights_only=False)
    model = build(ck["config"])
    model.load_state_dict(ck["ema"])
    digest = hashlib.sha256(Path(spec).read_bytes()).hexdigest()[:12]
    tag = "+held-out" if ck["config"].get("with_heldout") else ""
    return model.eval(), 2, f"sweep-{digest}{tag}"


class DrawProtocol:
    """The held-out protocol of a pair store, drawn repeatedly: the first n held-out pairs (x_0 the reference,
    x_T for the pair MSE), the metrics of a point set against that reference, and draw r's x_T (the seeds
    sample_seed + r n + [0, n): draw 0 is the protocol's own)."""

    def __init__(self, pairs: str):
        from storage_schemas import CheckerboardSpec, Eval2DConfig
        from pipeline.storage.pairstore import PairStore
        self.cfg, self.board = Eval2DConfig(), CheckerboardSpec()
        self.store = PairStore.open(pairs)
        held = self.store.heldout()
        if held is None:
            raise SystemExit(f"{pairs} has no held-out split")
        self.n = min(self.cfg.num_samples, len(held), len(self.store))
        self.reference, self.held_xT = held.read("x_0", 0, self.n), held.read("x_T", 0, self.n)

    def metrics(self, points: np.ndarray) -> dict:
        from pipeline.evaluation import metrics2d
        c, b = self.cfg, self.board
        return metrics2d.checkerboard_metrics(points, self.reference, swd_projections=c.swd_projections,
                                              swd_seed=c.swd_seed, eps=c.dbscan_eps, min_samples=c.dbscan_min_samples,
                                              z=c.zscore_threshold, low=b.low, high=b.high, scale=b.scale)

    def noise(self, r: int, dim: int) -> np.ndarray:
        from pipeline.evaluation.sample import noise_for_seeds
        start = self.cfg.sample_seed + r * self.n
        return noise_for_seeds(range(start, start + self.n), dim, self.store.manifest.x_T_scale)


def summarise(values: list[float]) -> dict:
    v = np.asarray(values, np.float64)
    return {"draw0": float(v[0]), "mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "draws": [float(x) for x in v]}


def paired(a: list[float], b: list[float]) -> dict:
    """``summarise`` of the per-draw differences a - b, with the standard error of their mean."""
    d = summarise(list(np.subtract(a, b)))
    d["stderr"] = d["std"] / np.sqrt(len(a))
    return d


def spread_cell(s: dict, fmt: str) -> str:
    """A table cell of a summarised metric: draw 0, then (mean ± std) over the draws."""
    return f"{s['draw0']:{fmt}} ({s['mean']:{fmt}} ± {s['std']:{fmt}})"


def write_outputs(out_dir: str | None, stem: str, result: dict, md: str) -> None:
    """``<stem>.json`` and ``<stem>.md`` into ``out_dir`` (nothing when it is None)."""
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / f"{stem}.md").write_text(md + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", required=True, help="the pair store the student was evaluated on (held-out split)")
    ap.add_argument("--student", required=True, help="a committed 2-D kdm student, or the EMA weights that "
                                                    "bench/sweep_checkerboard_import.py --save wrote (a .pt file)")
    ap.add_argument("--official-code", required=True, help="root of an azencot-group/KDM checkout")
    ap.add_argument("--official-model", required=True, help="its experiments/checkerboard/model.pt")
    ap.add_argument("--draws", type=int, default=10, help="sample draws per model (draw 0 = the protocol's)")
    ap.add_argument("--out", default=None, help="directory for official-vs-student.json / .md")
    a = ap.parse_args(argv)

    import torch
    torch.set_num_threads(1)
    from pipeline.evaluation import metrics2d
    from pipeline.evaluation.sample import generate

    p = DrawProtocol(a.pairs)
    n, reference = p.n, p.reference
    train_all = p.store.read("x_0", 0, len(p.store))
    student, dim, student_version = load_any_student(a.student)
    official = load_official(a.official_code, a.official_model)

    def swd_train(points: np.ndarray) -> float:
        return metrics2d.sliced_wasserstein(points, train_all, p.cfg.swd_projections, p.cfg.swd_seed)

    keys = METRICS + (SWD_TRAIN,)
    rows = {name: {m: [] for m in keys} for name in ("student", "official")}
    for r in range(a.draws):
        x_T = p.noise(r, dim)
        for name, fn in (("student", lambda x: generate(student, x)), ("official", official)):
            points = fn(x_T)
            m = dict(p.metrics(points), **{SWD_TRAIN: swd_train(points)})
            for k in keys:
                rows[name][k].append(m[k])
    teacher = {m: [] for m in METRICS}
    for s in range(0, (len(train_all) // n) * n, n):      # disjoint n-point slices of the train split
        m = p.metrics(train_all[s:s + n])
        for k in METRICS:
            teacher[k].append(m[k])
    teacher[SWD_TRAIN] = [swd_train(reference)]   # the held-out x_0 against the train split: disjoint

    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "protocol": p.cfg.model_dump(), "n": n, "draws": a.draws,
        "pairs": a.pairs, "pairs_version": p.store.version, "student": a.student,
        "student_version": student_version, "official_model": a.official_model,
        "rows": {name: {k: summarise(v) for k, v in d.items()} for name, d in rows.items()},
        "teacher_train_slices": {k: summarise(v) for k, v in teacher.items()},
        "pair_mse": {"student": metrics2d.pair_mse(generate(student, p.held_xT), reference),
                     "official": metrics2d.pair_mse(official(p.held_xT), reference)},
        "paired_difference_student_minus_official": {k: paired(rows["student"][k], rows["official"][k])
                                                     for k in keys},
        "train_split_size": len(train_all),
    }
    md = table(result)
    print(md)
    write_outputs(a.out, "official-vs-student", result, md)
    return 0


def table(result: dict) -> str:
    """The markdown table: one column per metric (SWD against the train split too, where the result has it)."""
    keys = METRICS + ((SWD_TRAIN,) if SWD_TRAIN in result["rows"]["student"] else ())
    heads = {"in_cell_fraction": "in-cell", "swd": "SWD", "outlier_rate": "outliers",
             SWD_TRAIN: f"SWD vs the train split's x_0 (n = {result.get('train_split_size', '?')})"}
    t = result["teacher_train_slices"]
    lines = [f"n = {result['n']} points per draw; draw 0 is the protocol's, (mean ± std) over {result['draws']} "
             f"draws (teacher: {len(t['swd']['draws'])} disjoint train slices"
             + ("; against the train split, the held-out x_0" if SWD_TRAIN in keys else "") + ")", "",
             "| model | " + " | ".join(heads[k] for k in keys) + " | held-out pair MSE |",
             "|---|" + "---|" * (len(keys) + 1)]
    for name, label in (("student", f"kdm student {result['student_version']}"),
                        ("official", "official KDM model (experiments/checkerboard/model.pt)")):
        r = result["rows"][name]
        lines.append(f"| {label} | " + " | ".join(spread_cell(r[k], ".4f") for k in keys)
                     + f" | {result['pair_mse'][name]:.3g} |")
    lines.append("| teacher x_0 (train split) | " + " | ".join(
        spread_cell(t[k], ".4f") if len(t[k]["draws"]) > 1 else f"{t[k]['draw0']:.4f}" for k in keys) + " | - |")
    d = result["paired_difference_student_minus_official"]
    lines.append("| student - official, paired (mean ± stderr) | " + " | ".join(
        f"{d[k]['mean']:+.4f} ± {d[k]['stderr']:.4f}" for k in keys) + " | - |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
