"""Checkerboard results table: students trained on the imported official KDM trajectories with the
`checkerboard-import` student preset (official objective, and with L_pred) and, on a GPU, the official
model + schedule; each evaluated
with the same protocol next to the teacher's own x_0. Variants run in parallel processes.

    python bench/checkerboard_results.py --data checkerboard-fm-trajectories.npy --root /tmp/cb --out results.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {
    "import / checkerboard-import preset (L_pred off, official objective)": [
        "--preset", "checkerboard-import", "--set", "student.train.threads=2"],
    "import / checkerboard-import preset with L_pred": [
        "--preset", "checkerboard-import", "--set", "student.model.use_pred_loss=true",
        "--set", "student.train.threads=2"],
    "import / checkerboard-official student on GPU": [
        "--preset", "checkerboard-import", "--set", "student.preset=checkerboard-official",
        "--set", "student.model.hidden=256", "--set", "student.model.latent_dim=256",
        "--set", "student.model.use_pred_loss=false", "--set", "student.train.lr=0.0003",
        "--set", "student.model.latent_noise=0.4", "--set", "student.model.fourier_features=0",
        "--set", "student.model.fourier_scale=1.0", "--set", "student.train.lr_schedule=constant",
        "--set", "student.train.batch_size=4096", "--set", "student.train.steps=20000",
        "--set", "student.train.device=cuda"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the kdm-trajectories .npy")
    p.add_argument("--root", required=True, help="artifact root")
    p.add_argument("--out", required=True, help="JSON results")
    p.add_argument("--skip-gpu", action="store_true")
    a = p.parse_args()
    procs = {}
    for name, args in VARIANTS.items():
        if a.skip_gpu and "GPU" in name:
            continue
        root = str(Path(a.root) / f"variant-{len(procs)}")   # one root each: stages do not lock
        cmd = [sys.executable, "-m", "pipeline.cli", "distill", "-q", "--root", root,
               "--set", f"import_uri={Path(a.data).resolve()}", *args]
        procs[name] = (subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
                       time.time())
    results = {}
    for name, (proc, t0) in procs.items():
        out, _ = proc.communicate()
        report = next((ln.split("report ")[-1].split(" ")[0] for ln in out.splitlines()
                       if ln.startswith("distilled:")), None)
        if proc.returncode != 0 or report is None:
            print(f"{name}: FAILED\n{out}", file=sys.stderr)
            continue
        rep = json.loads(Path(report.rstrip(",")).read_text())
        results[name] = {"wall_s": round(time.time() - t0, 1), "student": rep["student"],
                         "teacher": rep["teacher_reference"], "student_version": rep["student_version"]}
    Path(a.out).write_text(json.dumps(results, indent=2))
    print("| variant | student in-cell | teacher in-cell | student SWD | teacher SWD | student outliers | "
          "teacher outliers | held-out pair MSE | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        s, t = r["student"], r["teacher"]
        print(f"| {name} | {s['in_cell_fraction']:.4f} | {t['in_cell_fraction']:.4f} | {s['swd']:.4f} | "
              f"{t['swd']:.4f} | {s['outlier_rate']:.4f} | {t['outlier_rate']:.4f} | {s['pair_mse']:.2e} | "
              f"{r['wall_s']} |")


if __name__ == "__main__":
    main()
