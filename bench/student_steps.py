#!/usr/bin/env python
"""Student quality against training steps (and variants of the student objective) on one recipe run.

    python bench/student_steps.py --root /tmp/kdm-root --preset mini --steps 300,1000,2000 --out OUT
    python bench/student_steps.py --root /tmp/kdm-root --preset mini --steps 3000 \\
        --variant "adv0.01-late:model.adv_weight=0.01,model.adv_start=0.5,model.adv_rampup=0.25" --out OUT
    python bench/student_steps.py --root R --preset mini --steps 1000 --variant "nfe124:model.nfe_train=[1,2,4]" \\
        --set pairs.sampler.snapshot_steps=[5,9,14] --set evaluation.teacher_nfe=[3,5,9,17,35] --out OUT
    python bench/student_steps.py --root R --preset mini --cond --steps 1000 --out OUT --dry-run

Each row is the recipe itself (``pipeline.stages.run_recipe`` on ``build_config(recipe="cifar10", preset=...)``
with the student's ``train.steps`` set, its EMA decay sized to the run by the presets' rule
``storage_schemas.distill_image.ema_for_steps`` and a variant's ``student.*`` overrides): every stage
whose artifact exists under ``--root`` (dataset, extractor, perceptual network, teacher, pairs, filter,
e.g. from a ``kdm/distill-cifar10`` deployment run at the same root) is found, not recomputed; the student
and its evaluation run. A row records the student's steps, train seconds (from its manifest), the
evaluation's FD ratio, held-out MSE, precision / recall of teacher and student, and whether the student
collapsed (recall < 0.05), and for a multi-step student or an evaluation with ``teacher_nfe`` the FD ratio
at every other NFE (``frontier``). Rows go to ``OUT/steps.jsonl`` (a row already there is not rerun),
``OUT/steps.md`` (a table for BENCHMARKS.md) and ``OUT/steps.png`` (FD ratio, MSE and recall against steps,
one line per variant).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """'NAME:key=value,key=value' (keys relative to ``student``) -> (name, {"student.key": value})."""
    if ":" not in text:
        name, body = text.strip(), ""
    else:
        name, _, body = text.partition(":")
    sets: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in split_top(body))):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--variant {text!r}: expected NAME:key=value[,key=value...], got {item!r}")
        sets[f"student.{key.strip()}"] = value.strip()
    if not name.strip():
        raise ValueError(f"--variant {text!r}: the name is empty")
    return name.strip(), sets


def split_top(text: str) -> list[str]:
    """``text`` split at the commas outside brackets: 'a=[1,2],b=3' -> ['a=[1,2]', 'b=3']."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def row_config(preset: str, cond: bool, root: str, steps: int, sets: dict[str, str], extra: list[str] = ()):
    """The validated recipe config of one row (the preset with the student's steps, EMA and the variant)."""
    from pipeline.recipes import build_config
    from storage_schemas.distill_image import ema_for_steps
    base = [f"root={root}", f"student.train.steps={steps}", f"student.train.ema_decay={ema_for_steps(steps)}",
            f"student.train.checkpoint_every={steps}"]
    return build_config({"recipe": "cifar10", "preset": preset, "conditional": cond},
                        sets=base + list(extra) + [f"{k}={v}" for k, v in sets.items()])


def measure(cfg, quiet: bool) -> dict[str, Any]:
    from pipeline import stages
    res = stages.run_recipe(cfg, stages.StageContext(progress_bars=not quiet))
    ev, st = res["evaluation"], res["student"]
    keys = ("fd_ratio", "fd_teacher", "fd_student", "mse", "precision_teacher", "recall_teacher",
            "precision_student", "recall_student")
    from pipeline.evaluation.image_metrics import collapse_note
    # a multi-step student's other NFEs and the teacher's sampler cut short (evaluation.teacher_nfe)
    frontier = {k: v for k, v in ev.items() if k.startswith(("fd_ratio_nfe", "fd_ratio_teacher_nfe",
                                                                "fd_student_nfe", "fd_teacher_nfe"))}
    return {"student": st["uri"], "student_skipped": st["skipped"], "train_seconds": st["train_seconds"],
            "steps_done": st["steps"], "evaluation": ev["uri"], **{k: ev.get(k) for k in keys},
            "training_distance": ev["notes"].get("training_distance"), "collapsed": collapse_note(ev) is not None,
            "found": [k for k, r in res.items() if r["skipped"]], "frontier": frontier}


def gpu_name() -> str:
    import torch
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


HEADER = ("| date | GPU | variant | steps | student s | FD ratio | MSE | P / R teacher | P / R student | collapsed |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def markdown_row(r: dict) -> str:
    return (f"| {r['date']} | {r['gpu']} | {r['variant']} | {r['steps']} | {fmt(r['train_seconds'], '.0f')} | "
            f"{fmt(r['fd_ratio'], '.3f')} | {fmt(r['mse'], '.4f')} | "
            f"{fmt(r['precision_teacher'], '.3f')} / {fmt(r['recall_teacher'], '.3f')} | "
            f"{fmt(r['precision_student'], '.3f')} / {fmt(r['recall_student'], '.3f')} | "
            f"{'yes' if r['collapsed'] else 'no'} |")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name in dict.fromkeys(r["variant"] for r in rows):
        rs = sorted((r for r in rows if r["variant"] == name), key=lambda r: r["steps"])
        xs = [r["steps"] for r in rs]
        for ax, key in zip(axes, ("fd_ratio", "mse", "recall_student")):
            ax.plot(xs, [r[key] for r in rs], "o-", label=name)
    teacher_recall = next((r["recall_teacher"] for r in rows if r.get("recall_teacher") is not None), None)
    if teacher_recall is not None:
        axes[2].axhline(teacher_recall, color="gray", ls="--", label="teacher")
    for ax, title in zip(axes, ("FD ratio student / teacher", "held-out MSE to the teacher", "student recall")):
        ax.set_xlabel("student steps")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].axhline(1.0, color="gray", ls=":")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="artifact root (share it with the recipe run whose stages to reuse)")
    p.add_argument("--out", required=True, help="results directory (steps.jsonl, steps.md, steps.png)")
    p.add_argument("--preset", default="mini")
    p.add_argument("--cond", action="store_true", help="the class-conditional variant of the preset")
    p.add_argument("--steps", default="300,1000,2000,4000", help="comma-separated student step counts")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:key=value,...",
                   help="a student variant (keys under student., e.g. model.adv_weight=0.01); default: the preset")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe override for every row, e.g. dataset.archive=/data/cifar10.tar.gz")
    p.add_argument("--dry-run", action="store_true", help="validate every row's config and print it")
    p.add_argument("-q", "--quiet", action="store_true")
    a = p.parse_args(argv)
    steps = [int(s) for s in a.steps.split(",") if s.strip()]
    variants = [parse_variant(v) for v in a.variant] or [("preset", {})]
    out = Path(a.out)
    rows_path = out / "steps.jsonl"
    done = {}
    if rows_path.exists():
        for line in rows_path.read_text().splitlines():
            r = json.loads(line)
            done[(r["variant"], r["steps"], json.dumps(r["sets"], sort_keys=True))] = r
    plan = [(name, sets, n, row_config(a.preset, a.cond, a.root, n, sets, a.set)) for name, sets in variants for n in steps]
    if a.dry_run:
        for name, sets, n, cfg in plan:
            m = cfg.student.model
            print(f"{name} steps={n}: distance={m.distance} adv_weight={m.adv_weight} adv_start={m.adv_start} "
                  f"adv_rampup={m.adv_rampup} ema={cfg.student.train.ema_decay} precision={cfg.student.train.precision}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    rows = list(done.values())
    for name, sets, n, cfg in plan:
        key = (name, n, json.dumps(sets, sort_keys=True))
        if key in done:
            print(f"{name} steps={n}: measured before, kept", flush=True)
            continue
        r = {"variant": name, "sets": sets, "steps": n, "preset": a.preset, "conditional": a.cond, "gpu": gpu_name(),
             "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), **measure(cfg, a.quiet)}
        rows.append(r)
        with rows_path.open("a") as f:
            f.write(json.dumps(r) + "\n")
        print(markdown_row(r), flush=True)
    (out / "steps.md").write_text(HEADER + "\n" + "\n".join(markdown_row(r) for r in rows) + "\n")
    plot(rows, out / "steps.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
