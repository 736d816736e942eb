"""``kdm distill`` (every stage of a recipe, without Prefect) and ``kdm evaluate`` of image students.

  kdm distill --recipe checkerboard --preset checkerboard --root artifacts   # CPU, minutes
  kdm distill --recipe checkerboard --preset checkerboard-import             # on the official trajectories
  kdm distill --recipe cifar10 --preset smoke --root runs/cifar10-smoke      # CPU, about a minute
  kdm distill --recipe cifar10 --preset mini --dry-run                       # the stages, their versions, what exists
  kdm distill --recipe cifar10 --preset mini --cond --set student.train.steps=8000   # class-conditional, one GPU
  kdm distill --recipe cifar10 --preset full --set teacher_uri=artifacts/teachers/edm-...   # an existing teacher
  kdm evaluate --student runs/student --pairs runs/pairs --dataset runs/cifar10 --extractor runs/extractor --out runs/eval
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.cli.common import add_command as add, plus_minus, summary
from pipeline.errors import KDMError

EXAMPLES = "examples:\n  " + __doc__.split("\n\n", 1)[1].strip()


def load_config(recipe: str, preset: str | None, conditional: bool, sets, base: str | Path,
                config_file: str | None = None):
    """The recipe's config of ``preset`` (``conditional``: cifar10's class-conditional variant), fields of
    ``config_file`` and ``--set`` overrides on top; relative paths resolve against ``base``."""
    from pipeline import presets, recipes, stages
    data, _ = presets.raw_config("distill", None, config_file) if config_file else ({}, "")
    data = {**data, "recipe": recipe}
    if preset:
        data["preset"] = preset
    if conditional:
        if recipe != "cifar10":
            raise KDMError("--cond applies to the cifar10 recipe only")
        data["conditional"] = True
    return stages.resolve_paths(recipes.build_config(data, sets=sets), base)


def cmd_distill(a) -> None:
    from pipeline import recipes, stages
    cfg = load_config(a.recipe, a.preset, a.cond, list(a.set) + ([f"root={a.root}"] if a.root else []), Path.cwd(),
                      a.config)
    if a.dry_run:
        plan = stages.plan(cfg)
        print(stages.format_plan(plan))
        summary(f"dry run: recipe {cfg.recipe}, preset {cfg.preset}"
                f"{' conditional' if getattr(cfg, 'conditional', False) else ''}, {len(plan['todo'])} of "
                f"{len(plan['stages'])} stages to do under {cfg.root}")
        return
    from pipeline.data import sources
    sources.ensure_dataset(cfg, progress=not a.quiet, log=lambda m: print(m, file=sys.stderr))
    res = stages.run_recipe(cfg, stages.StageContext(progress_bars=not a.quiet))
    print(recipes.RECIPES[cfg.recipe].report_parts(cfg, res)["table_text"])
    ev = res["evaluation"]
    if cfg.recipe == "cifar10":
        summary(f"distilled: student {res['student']['version']}, {ev['metric_names']['fd']} teacher "
                f"{ev['fd_teacher']:.4g} student {ev['fd_student']:.4g} (ratio {ev['fd_ratio']:.3f}), MSE "
                f"{ev['mse']:.4g}{plus_minus(ev.get('mse_stderr'))}, report {ev['report']}; dataset: {res['dataset'].get('source', 'source not recorded')}")
        if ev.get("notes", {}).get("collapse"):
            print(f"warning: student {ev['notes']['collapse']}", file=sys.stderr)
    else:
        summary(f"distilled: student {res['student']['version']}, report {ev['report']}")


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
    from pipeline import presets
    from pipeline.storage import manifests
    missing = [opt for opt, v in (("--dataset", a.dataset), ("--extractor", a.extractor)) if not v]
    if missing:
        raise KDMError(f"{a.student} is an image student: its evaluation also needs {' and '.join(missing)} (the "
                       f"prepared dataset of the reference statistics and the feature extractor of FD/KID)")
    if a.out.endswith(".json"):
        raise KDMError(f"an image evaluation is a directory (metrics.json, manifest.json, PNGs): give --out DIR, "
                       f"not {a.out}")
    cfg = presets.validate(ImageEvalStageConfig, presets.apply_sets({}, a.set), "evaluation options")
    manifests.check_pair_store(a.pairs)           # before torch: wrong inputs fail fast
    manifests.check_dataset(a.dataset)
    from pipeline.evaluation import image_metrics
    from pipeline.evaluation.evaluate_image import evaluate_image
    m, existed = evaluate_image(a.out, a.dataset, a.extractor, a.pairs, a.student, cfg, a.device,
                                a.root, teacher_uri=a.teacher)
    print(image_metrics.metrics_markdown(image_metrics.read_report(a.out).metrics))
    s = m.summary
    summary(f"{m.metric_names['fd']} teacher {s['fd_teacher']:.4g} student {s['fd_student']:.4g} (ratio "
            f"{s['fd_ratio']:.3f}), MSE {s['mse']:.4g}{plus_minus(s.get('mse_stderr'))} on {m.num_samples} held-out seeds -> {a.out}"
            + (" (already there)" if existed else "")
            + f"; dataset: {m.notes.get('dataset_source', 'source not recorded')}")
    if m.notes.get("collapse"):
        print(f"warning: student {m.notes['collapse']}", file=sys.stderr)


def add_evaluate_options(sp) -> None:
    """The ``kdm evaluate`` options that only image students use."""
    sp.add_argument("--dataset", default=None, help="image students: prepared dataset (reference = its train split)")
    sp.add_argument("--extractor", default=None, help="image students: feature extractor artifact of FD/KID")
    sp.add_argument("--device", default="cpu", help="image students: cpu | cuda (default cpu)")
    sp.add_argument("--root", default="artifacts", help="image students: where reference statistics are cached")


def add_commands(subparsers) -> None:
    sp = add(subparsers, "distill", cmd_distill,
             "every stage of a recipe without Prefect (cifar10: dataset, extractor, teacher, pairs, filter, student, "
             "evaluation; checkerboard: teacher or import, pairs, filter, student, evaluation)", EXAMPLES)
    sp.add_argument("--recipe", default="checkerboard", choices=("checkerboard", "cifar10"),
                    help="checkerboard (2-D, CPU) or cifar10 (images); default checkerboard")
    sp.add_argument("--preset", default=None,
                    help="cifar10: smoke (CPU, tiny) | mini (one GPU, minutes) | full (the paper's recipe; default); "
                         "checkerboard: a configs/distill preset (default checkerboard)")
    sp.add_argument("--cond", action="store_true", help="cifar10: class-conditional teacher and student")
    sp.add_argument("--config", default=None, help="YAML/JSON file of config fields (the preset fills the rest)")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any config field, e.g. student.train.steps=100 or teacher_uri=DIR")
    sp.add_argument("--root", default=None, help="artifact root (default from the config: artifacts)")
    sp.add_argument("--dry-run", action="store_true", help="print the stages, their output versions and what exists")
