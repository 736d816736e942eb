"""Wall time of `kdm --help` and of error exits, command by command (goal: <= 0.5 s on a 2-core machine).

Each case runs the installed CLI (`python -m pipeline.cli`) in a fresh process, as a user's shell would,
``--repeat`` times; the median is reported with the exit code and the first line of the message. Fixtures
(a small imported pair store, a copy with a forged version, a plain file, a smoke teacher and student) are
built once in ``--workdir``; their build time is not measured.

    python bench/cli_latency.py                       # every case, 5 runs each, a markdown table
    python bench/cli_latency.py --repeat 9 --json docs/bench/cli-latency.json
    python bench/cli_latency.py --only pairs          # the cases whose name contains 'pairs'
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOAL_S = 0.5

# (name, argv with {w} = workdir, expected exit code)
CASES = [
    ("kdm --help", ["--help"], 0),
    ("unknown command", ["frobnicate"], 2),
    ("pairs info: missing path", ["pairs", "info", "{w}/nope"], 1),
    ("pairs info: plain file", ["pairs", "info", "{w}/plain.txt"], 1),
    ("pairs info: forged version", ["pairs", "info", "{w}/forged"], 1),
    ("pairs info --verify: deleted chunk", ["pairs", "info", "{w}/damaged", "--verify"], 1),
    ("pairs generate: missing teacher", ["pairs", "generate", "--teacher", "{w}/nope", "--seeds", "0-99",
                                         "--out", "{w}/o1"], 1),
    ("pairs generate: reversed seeds", ["pairs", "generate", "--teacher", "{w}/teacher", "--seeds", "100-10",
                                        "--out", "{w}/o2"], 2),
    ("pairs import: missing source", ["pairs", "import", "{w}/nope.npy", "--format", "kdm-trajectories", "--holdout", "0.2",
                                      "--out", "{w}/o3"], 1),
    ("pairs import: (N, 2) array", ["pairs", "import", "{w}/n2.npy", "--format", "kdm-trajectories", "--holdout", "0.2",
                                    "--out", "{w}/o4"], 1),
    ("pairs filter: missing store", ["pairs", "filter", "--pairs", "{w}/nope", "--out", "{w}/o5"], 1),
    ("pairs filter: forged version", ["pairs", "filter", "--pairs", "{w}/forged", "--out", "{w}/o6"], 1),
    ("train: missing store", ["train", "--pairs", "{w}/nope", "--preset", "smoke", "--out", "{w}/o7"], 1),
    ("train: unknown preset", ["train", "--pairs", "{w}/pairs", "--preset", "nosuch", "--out", "{w}/o8"], 1),
    ("train: bad --set", ["train", "--pairs", "{w}/pairs", "--preset", "smoke", "--set", "train.steps=-1",
                          "--out", "{w}/o9"], 1),
    ("train: forged version", ["train", "--pairs", "{w}/forged", "--preset", "smoke", "--out", "{w}/o10"], 1),
    ("train: --out is a pair store", ["train", "--pairs", "{w}/pairs", "--preset", "smoke",
                                      "--out", "{w}/pairs"], 1),
    ("sample: missing student", ["sample", "--student", "{w}/nope", "--num", "10", "--out", "{w}/s.npy"], 1),
    ("sample: --num 0", ["sample", "--student", "{w}/student", "--num", "0", "--out", "{w}/s.npy"], 1),
    ("evaluate: missing student", ["evaluate", "--student", "{w}/nope", "--pairs", "{w}/pairs",
                                   "--out", "{w}/r1/report.json"], 1),
    ("evaluate: forged pairs", ["evaluate", "--student", "{w}/student", "--pairs", "{w}/forged",
                                "--out", "{w}/r2/report.json"], 1),
    ("teacher train: unknown preset", ["teacher", "train", "--preset", "nosuch", "--out", "{w}/o11"], 1),
    ("teacher register: missing uri", ["teacher", "register", "{w}/nope.pkl", "--kind", "edm-pkl",
                                       "--root", "{w}/reg"], 1),
    ("teacher bootstrap: missing dataset", ["teacher", "bootstrap", "--dataset", "{w}/nope", "--out", "{w}/o12"], 1),
    ("dataset prepare: missing archive", ["dataset", "prepare", "{w}/nope.tar.gz", "--out", "{w}/o13"], 1),
    ("train-image: missing store", ["train-image", "--pairs", "{w}/nope", "--preset", "cifar10-uncond", "--out", "{w}/o14"], 1),
    ("model info: unknown preset", ["model", "info", "--preset", "nosuch"], 1),
    ("distill: unknown preset", ["distill", "--recipe", "checkerboard", "--preset", "nosuch",
                                 "--root", "{w}/o15"], 1),
    ("extractor info: missing", ["extractor", "info", "{w}/nope"], 1),
]


def kdm(argv: list[str], env: dict, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "pipeline.cli", *argv], cwd=REPO, env=env, capture_output=True,
                       text=True)
    if check and p.returncode != 0:
        raise SystemExit(f"fixture command failed: kdm {' '.join(argv)}\n{p.stderr.strip()}")
    return p


def build_fixtures(w: Path, env: dict) -> None:
    import numpy as np
    import zarr

    if (w / "student").exists():
        return
    rng = np.random.default_rng(0)
    np.save(w / "traj.npy", rng.standard_normal((3, 2000, 2)).astype(np.float32))
    np.save(w / "n2.npy", rng.standard_normal((200, 2)).astype(np.float32))
    (w / "plain.txt").write_text("not a store\n")
    kdm(["pairs", "import", str(w / "traj.npy"), "--format", "kdm-trajectories", "--holdout", "0.2",
         "--chunk-size", "400", "--out", str(w / "pairs"), "-q"], env)
    for name in ("forged", "damaged"):
        shutil.copytree(w / "pairs", w / name)
    g = zarr.open_group(str(w / "forged"), mode="r+")
    g.attrs["kdm"] = {**g.attrs["kdm"], "version": "pairs-0000000000000000"}
    (w / "damaged" / "x_0" / "c" / "1" / "0").unlink()
    kdm(["teacher", "train", "--preset", "smoke", "--out", str(w / "teacher"), "-q"], env)
    kdm(["train", "--pairs", str(w / "pairs"), "--preset", "smoke", "--set", "train.steps=20",
         "--out", str(w / "student"), "-q"], env)


def time_case(argv: list[str], env: dict, repeat: int) -> tuple[float, list[float], int, str]:
    times, rc, msg = [], None, ""
    for _ in range(repeat):
        t0 = time.perf_counter()
        p = kdm(argv, env, check=False)
        times.append(time.perf_counter() - t0)
        rc = p.returncode
        lines = [ln for ln in (p.stderr or p.stdout).splitlines() if ln.strip()]
        msg = lines[0] if lines else ""
    return statistics.median(times), times, rc, msg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="\n".join(__doc__.split("\n\n")[-1:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5, help="runs per case (median reported; default 5)")
    ap.add_argument("--workdir", help="fixtures folder (default: a fresh temporary one, removed after)")
    ap.add_argument("--only", default="", help="run the cases whose name contains this text")
    ap.add_argument("--json", help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    w = Path(args.workdir or tempfile.mkdtemp(prefix="kdm-latency-")).resolve()
    w.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": ""}
    env.pop("PREFECT_API_URL")
    print(f"building fixtures in {w} ...", file=sys.stderr)
    build_fixtures(w, env)
    rows = []
    for name, case_argv, want in CASES:
        if args.only not in name:
            continue
        cmd = [a.format(w=w) for a in case_argv]
        med, times, rc, msg = time_case(cmd, env, args.repeat)
        rows.append({"case": name, "command": "kdm " + " ".join(case_argv), "median_s": round(med, 3),
                     "runs_s": [round(t, 3) for t in times], "exit": rc, "expected_exit": want,
                     "message": msg[:160]})
        flag = "" if rc == want else f"  (expected exit {want})"
        print(f"{med:6.3f} s  exit {rc}  {name}{flag}", file=sys.stderr)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {load:.2f}, median of {args.repeat} runs; goal <= {GOAL_S} s\n")
    print("| case | median s | exit | message (first line) |\n|---|---|---|---|")
    for r in rows:
        mark = "" if r["median_s"] <= GOAL_S else " **over**"
        print(f"| {r['case']} | {r['median_s']:.3f}{mark} | {r['exit']} | {r['message'][:100].replace('|', '/')} |")
    over = [r for r in rows if r["median_s"] > GOAL_S]
    wrong = [r for r in rows if r["exit"] != r["expected_exit"]]
    print(f"\n{len(rows)} cases, {len(over)} over {GOAL_S} s, {len(wrong)} with an unexpected exit code")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(),
                                               "load_average": load, "repeat": args.repeat, "rows": rows}, indent=1))
    if not args.workdir:
        shutil.rmtree(w, ignore_errors=True)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
