"""``kdm distill-image`` (the CIFAR-10 distillation without Prefect) and ``kdm evaluate`` of image students.

  kdm distill-image --preset smoke --root runs/cifar10-smoke                 # CPU, about a minute
  kdm distill-image --preset mini --dry-run                                  # the stages, their versions, what exists
  kdm distill-image --preset mini --cond --set student.train.steps=8000      # class-conditional, on one GPU
  kdm distill-image --preset full --set teacher_uri=artifacts/teachers/edm-...   # distill an existing teacher
  kdm evaluate --student runs/student --pairs runs/pairs --dataset runs/cifar10 --extractor runs/extractor --out runs/eval
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.cli.common import add_command as add, summary
from pipeline.errors import KDMError

EXAMPLES = "examples:\n  " + __doc__.split("\n\n", 1)[1].strip()


def load_config(preset: str, conditional: bool, sets, base: str | Path):
    """DistillImageConfig of ``preset`` (class-conditional with ``conditional``) with ``--set`` overrides;
    relative paths resolve against ``base``."""
    from storage_schemas.distill_image import DistillImageConfig
    from pipeline import presets
    from pipeline import stages_image
    data = {"preset": preset, "conditional": conditional}
    source = f"distill-image preset {preset!r}" + (" (conditional)" if conditional else "")
    cfg = presets.validate_with_sets(DistillImageConfig, data, source, sets)
    return stages_image.resolve_paths(cfg, base)


def cmd_distill_image(a) -> None:
    from pipeline import stages_image
    cfg = load_config(a.preset, a.cond, list(a.set) + ([f"root={a.root}"] if a.root else []), Path.cwd())
    if a.dry_run:
        plan = stages_image.plan_distill_image(cfg)
        print(stages_image.format_plan(plan))
        summary(f"dry run: preset {cfg.preset}{' conditional' if cfg.conditional else ''}, "
                f"{len(plan['todo'])} of {len(plan['stages'])} stages to do under {cfg.root}")
        return
    res = stages_image.run_distill_image(cfg, progress=not a.quiet)
    ev = res["evaluation"]
    summary(f"distilled: student {res['student']['version']}, {ev['metric_names']['fd']} teacher "
            f"{ev['fd_teacher']:.4g} student {ev['fd_student']:.4g} (ratio {ev['fd_ratio']:.3f}), MSE {ev['mse']:.4g}, "
            f"report {ev['report']}")


def is_image_student(run: str) -> bool:
    """Whether the student run at ``run`` is an image KDM student (by its manifest's format)."""
    from pipeline.storage import artifacts
    try:
        raw = artifacts.read_json(artifacts.join(run, artifacts.MANIFEST))
    except FileNotFoundError:
        raise KDMError(f"{run} holds no finished student (no {artifacts.MANIFEST}); train one first") from None
    except json.JSONDecodeError as e:
        raise KDMError(f"{run}/{artifacts.MANIFEST} is not valid JSON: {e}") from None
    return isinstance(raw, dict) and raw.get("format") == "kdm-image-student"


def cmd_evaluate_image(a) -> None:
    """``kdm evaluate`` of an image student: FD/KID of teacher and student, ratio, MSE (LPIPS), grids."""
    from storage_schemas.distill_image import ImageEvalStageConfig
    from pipeline.evaluation import image_metrics
    from pipeline import presets
    from pipeline import stages_image
    missing = [opt for opt, v in (("--dataset", a.dataset), ("--extractor", a.extractor)) if not v]
    if missing:
        raise KDMError(f"{a.student} is an image student: its evaluation also needs {' and '.join(missing)} (the "
                       f"prepared dataset of the reference statistics and the feature extractor of FD/KID)")
    if a.out.endswith(".json"):
        raise KDMError(f"an image evaluation is a directory (metrics.json, manifest.json, PNGs): give --out DIR, "
                       f"not {a.out}")
    cfg = presets.validate(ImageEvalStageConfig, presets.apply_sets({}, a.set), "evaluation options")
    m, existed = stages_image.evaluate_image(a.out, a.dataset, a.extractor, a.pairs, a.student, cfg, a.device,
                                             a.root)
    print(image_metrics.metrics_markdown(image_metrics.read_report(a.out).metrics))
    s = m.summary
    summary(f"{m.metric_names['fd']} teacher {s['fd_teacher']:.4g} student {s['fd_student']:.4g} (ratio "
            f"{s['fd_ratio']:.3f}), MSE {s['mse']:.4g} on {m.num_samples} held-out seeds -> {a.out}"
            + (" (already there)" if existed else ""))


def add_evaluate_options(sp) -> None:
    """The ``kdm evaluate`` options that only image students use."""
    sp.add_argument("--dataset", default=None, help="image students: prepared dataset (reference = its train split)")
    sp.add_argument("--extractor", default=None, help="image students: feature extractor artifact of FD/KID")
    sp.add_argument("--device", default="cpu", help="image students: cpu | cuda (default cpu)")
    sp.add_argument("--root", default="artifacts", help="image students: where reference statistics are cached")


def add_commands(subparsers) -> None:
    sp = add(subparsers, "distill-image", cmd_distill_image,
             "CIFAR-10: dataset, extractor, EDM teacher, pairs, KDM student, evaluation, without Prefect", EXAMPLES)
    sp.add_argument("--preset", default="smoke", choices=("smoke", "mini", "full"),
                    help="smoke (CPU, tiny), mini (one GPU, minutes), full (the paper's recipe)")
    sp.add_argument("--cond", action="store_true", help="class-conditional teacher and student")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any DistillImageConfig field, e.g. student.train.steps=100 or teacher_uri=DIR")
    sp.add_argument("--root", default=None, help="artifact root (default from the config: artifacts)")
    sp.add_argument("--dry-run", action="store_true", help="print the stages, their output versions and what exists")
