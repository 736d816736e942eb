"""A multi-step checkerboard student at each of its NFEs (and the teacher cut short), over several sample draws.

One draw of the held-out protocol (storage_schemas.Eval2DConfig: n = 10,000 samples against 10,000 held-out
teacher x_0) cannot rank two samplers whose SWDs differ by 0.001: two independent 10,000-point sets of one
distribution differ by 0.03-0.07 (RESULTS.md). As `bench/checkerboard_official_model.py` does for two models,
this scores every NFE of one student on the same x_T in each draw (draw 0 = the protocol's seeds
1,000,000 + [0, n), then the next disjoint ranges), so that the difference NFE m - NFE 1 is paired and its
standard error small. With --teacher, the teacher's ODE solver cut short to --teacher-nfe is scored the same way;
with --other, another student's one-step map too, and every NFE of the student is paired against it as well (e.g.
a one-step student trained for the same time). The held-out pair MSE's differences are paired over the
held-out pairs (mean ± standard error).

    python bench/checkerboard_nfe_draws.py --pairs ROOT/pairs/filtered-... --student ROOT/students/kdm-... \\
        [--teacher ROOT/teachers/fm-... --teacher-nfe 1,2,4,8] [--other ROOT/students/kdm-...] [--draws 10] \\
        [--out OUTDIR]

Writes OUTDIR/nfe-draws.json and .md, and prints the table.
"""
from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.checkerboard_official_model import (METRICS, DrawProtocol, paired, spread_cell, summarise,  # noqa: E402
                                               write_outputs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", required=True, help="the pair store the student was evaluated on (held-out split)")
    ap.add_argument("--student", required=True, help="a committed 2-D kdm student (multi-step or not)")
    ap.add_argument("--teacher", default=None, help="the flow-matching teacher run, to cut its solver short")
    ap.add_argument("--teacher-nfe", default="1,2,4,8", help="NFEs of the teacher's solver (with --teacher)")
    ap.add_argument("--other", default=None, help="another student, scored at NFE 1 and paired against")
    ap.add_argument("--draws", type=int, default=10, help="sample draws (draw 0 = the protocol's)")
    ap.add_argument("--out", default=None, help="directory for nfe-draws.json / .md")
    a = ap.parse_args(argv)

    import torch
    torch.set_num_threads(1)
    from pipeline.evaluation.paired import pair_errors, standard_error
    from pipeline.evaluation.sample import generate, load_student

    p = DrawProtocol(a.pairs)
    store, n, reference, held_xT = p.store, p.n, p.reference, p.held_xT
    student, manifest = load_student(a.student)
    samplers = {f"student {m} NFE": (lambda x, m=m: generate(student, x, nfe=m)) for m in manifest.nfe_trained}
    other = None
    if a.other:
        other_model, other_manifest = load_student(a.other)
        other = f"other student {other_manifest.version} 1 NFE"
        samplers[other] = lambda x: generate(other_model, x)
    if a.teacher:
        from models.samplers import integrate_ode
        from pipeline.teachers.flow_matching import load_teacher
        velocity, _ = load_teacher(a.teacher)
        for k in (int(v) for v in a.teacher_nfe.split(",")):
            s = store.manifest.sampler.at_nfe(k)

            def cut(x, s=s):
                with torch.no_grad():
                    return integrate_ode(velocity, torch.from_numpy(np.ascontiguousarray(x, np.float32)), s.steps,
                                         s.method).numpy()
            samplers[f"teacher, {s.describe()}"] = cut

    rows = {name: {m: [] for m in METRICS} for name in samplers}
    for r in range(a.draws):
        x_T = p.noise(r, manifest.model.dim)
        for name, fn in samplers.items():
            m = p.metrics(fn(x_T))
            for k in METRICS:
                rows[name][k].append(m[k])
    errors = {name: pair_errors(fn(held_xT), reference) for name, fn in samplers.items()}

    def difference(name: str, base: str) -> dict:
        """Paired differences name - base: the metrics over the draws, the pair MSE over the held-out pairs."""
        d = {k: paired(rows[name][k], rows[base][k]) for k in METRICS}
        diff = errors[name] - errors[base]
        d["pair_mse"] = {"mean": float(diff.mean()), "stderr": standard_error(diff)}
        return d
    one = "student 1 NFE"
    differences = {name: difference(name, one) for name in samplers if name.startswith("student") and name != one}
    if other:
        for name in [s for s in samplers if s.startswith("student")]:
            differences[f"{name} - other"] = difference(name, other)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "protocol": p.cfg.model_dump(),
              "n": n, "draws": a.draws, "pairs": a.pairs, "pairs_version": store.version, "student": a.student,
              "student_version": manifest.version, "teacher": a.teacher, "other": a.other,
              "rows": {name: {k: summarise(v) for k, v in d.items()} for name, d in rows.items()},
              "pair_mse": {name: float(e.mean()) for name, e in errors.items()},
              "paired_difference_minus_1_nfe": differences}
    md = table(result)
    print(md)
    write_outputs(a.out, "nfe-draws", result, md)
    return 0


def table(result: dict) -> str:
    cell = spread_cell
    lines = [f"n = {result['n']} points per draw; draw 0 is the protocol's, (mean ± std) over {result['draws']} "
             f"draws on the same x_T for every row", "",
             "| sampler | in-cell | SWD | outliers | held-out pair MSE |", "|---|---|---|---|---|"]
    for name, r in result["rows"].items():
        lines.append(f"| {name} | {cell(r['in_cell_fraction'], '.4f')} | {cell(r['swd'], '.4f')} | "
                     f"{cell(r['outlier_rate'], '.4f')} | {result['pair_mse'][name]:.3g} |")
    for name, d in result["paired_difference_minus_1_nfe"].items():
        what = name if name.endswith(" - other") else f"{name} - student 1 NFE"
        mse = d.get("pair_mse")     # records written before the paired pair MSE have none
        lines.append(f"| {what}, paired (mean ± stderr) | {d['in_cell_fraction']['mean']:+.4f} ± "
                     f"{d['in_cell_fraction']['stderr']:.4f} | {d['swd']['mean']:+.5f} ± {d['swd']['stderr']:.5f} | "
                     f"{d['outlier_rate']['mean']:+.4f} ± {d['outlier_rate']['stderr']:.4f} | "
                     + (f"{mse['mean']:+.2e} ± {mse['stderr']:.1e} |" if mse else "- |"))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
