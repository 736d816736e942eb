"""The ``kdm`` command line. Every command prints a one-line summary; errors exit non-zero with a
message that says what to fix."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.cli.common import add_command as add
from pipeline.cli.common import plus_minus
from pipeline.cli.common import (add_snapshot_options, heldout_count, open_pairs, pairs_dry_run, pairs_generate_config,
                                 pairs_import_config, parse_int_list,
                                 require_local_input, snapshot_steps_option, summary)
from pipeline.errors import KDMError

EXAMPLES = """\
examples (the whole checkerboard pipeline, step by step):
  kdm teacher train --preset checkerboard --out runs/teacher
  kdm pairs generate --teacher runs/teacher --seeds 0-49999 --heldout-seeds 50000-59999 --out runs/pairs
  kdm pairs import checkerboard-fm-trajectories.npy --format kdm-trajectories --holdout 0.2 --out runs/official
  kdm pairs import gen.npz --format npz --holdout 0 --out runs/pairs      # also kdm-npz (--order), get-pt
  kdm pairs filter --pairs runs/pairs --near-duplicate-radius 0.0005 --out runs/pairs-filtered
  kdm train --pairs runs/pairs-filtered --preset checkerboard --set train.steps=4000 --out runs/student
  kdm sample --student runs/student --num 1000 --seed 0 --out samples.npy
  kdm evaluate --student runs/student --pairs runs/pairs-filtered --out runs/report.json
or all stages at once, without Prefect:
  kdm distill --recipe checkerboard --preset checkerboard --root artifacts
  kdm distill --recipe cifar10 --preset smoke --root runs/cifar10-smoke
"""


def cmd_teacher_train(a) -> None:
    from pipeline import presets
    cfg = presets.load("teacher", a.preset, a.config, a.set)
    from pipeline.storage import artifacts
    artifacts.precheck_target(a.out, "(kdm-teacher)")      # before torch: a wrong --out fails fast
    from pipeline.teachers import flow_matching as teacher
    if a.dry_run:
        summary(f"dry run: would train teacher {teacher.teacher_version(cfg)} -> {a.out}\n{cfg.model_dump_json(indent=2)}")
        return
    m = teacher.train_teacher(cfg, a.out, progress=not a.quiet)
    summary(f"teacher {m.id} ({m.kind}, final loss {m.final_loss:.4f}) at {a.out} sha256 {m.weights_sha256[:16]}")


def cmd_pairs_generate(a) -> None:
    cfg = pairs_generate_config(a, {"method": a.method, "steps": a.steps,
                                    **snapshot_steps_option(a, a.steps)}, "pairs generate options")
    require_local_input(a.teacher, "teacher")
    from pipeline.storage import artifacts
    artifacts.precheck_target(a.out, "pair store")           # before torch: a wrong --out fails fast
    from pipeline.pairs import generate
    if a.dry_run:
        from pipeline.storage.manifests import read_teacher_manifest
        pairs_dry_run(cfg, generate.pairs_version(read_teacher_manifest(a.teacher).id, cfg), a.out)
        return
    v = generate.generate_pairs(a.teacher, cfg, a.out, progress=not a.quiet)
    snaps = cfg.sampler.snapshot_steps
    summary(f"pairs {v}: {len(cfg.seeds)} train + {heldout_count(cfg)} held out"
            + (f", {len(snaps)} trajectory snapshots (after steps {', '.join(map(str, snaps))})" if snaps else "")
            + f" at {a.out}")


IMPORT_FORMATS = {
    "kdm-trajectories": "the official KDM checkerboard file: one numeric (T, N, D) .npy, x_T=[0], x_0=[-1], "
                        "stored as float32",
    "kdm-npz": "the official KDM image data: a folder of path<i>.npz (arr_0, or endpoints + one-hot label); "
               "needs --order",
    "get-pt": "GET's pairs: a folder with latent/ and image/ torch.save files (unit latents x --noise-scale)",
    "npz": "one .npz with arrays x_T, x_0 (N, C, H, W) and optionally seed (N,), label (N,) or one-hot (N, K), "
           "as other samplers export them (images are stored as float32 too)",
}


def _flag(field, value=None) -> str:
    """A config field (and value) as the kdm pairs import command line spells it."""
    text = "--" + field.replace("_", "-") if field else ""
    return f"{text} {value}".strip() if value is not None else text


def cmd_pairs_import(a) -> None:
    if a.format not in IMPORT_FORMATS:
        raise KDMError(f"--format {a.format!r} is not a known import format; formats: {', '.join(IMPORT_FORMATS)} "
                       f"(kdm pairs import --help describes them)")
    from storage_schemas.stages import import_options_problem
    problem = import_options_problem(a.format, a.order, a.noise_scale, name=_flag)
    if problem:
        raise KDMError(problem)
    snapshots = None
    if a.snapshots is not None:
        if a.format != "kdm-trajectories":
            raise KDMError(f"--snapshots applies to --format kdm-trajectories (a file of whole trajectories), not "
                           f"{a.format}")
        snapshots = "all" if a.snapshots.strip() == "all" else parse_int_list(a.snapshots, "--snapshots")
    cfg = pairs_import_config(a, "pairs import options", order=a.order, noise_scale=a.noise_scale,
                              snapshots=snapshots)
    require_local_input(a.src, "source")
    from pipeline.pairs import importer
    v = importer.import_pairs(a.src, cfg, a.out)
    s, held = open_pairs(a.out)
    scale = "" if cfg.format == "kdm-trajectories" else \
        f" (x_T_scale {s.manifest.x_T_scale:g}, {s.manifest.num_classes} classes)"
    snap = s.manifest.snapshots
    kept = f", {snap.count} trajectory snapshots (t = {', '.join(f'{t:.3g}' for t in snap.levels)})" if snap else ""
    summary(f"imported {v}: {len(s)} train + {held} held out{kept} from {a.src}{scale} at {a.out}")


def cmd_pairs_filter(a) -> None:
    from pipeline.storage import manifests
    m = manifests.check_pair_store(a.pairs)      # before numpy / torch: a wrong input fails fast
    if len(m.sample_shape) == 3:
        if a.dataset:
            manifests.check_dataset(a.dataset)
        return cmd_pairs_filter_images(a)
    from storage_schemas import FilterConfig
    from pipeline.pairs import filter as filt
    from pipeline import presets
    image_only = [f"--{k.replace('_', '-')}" for k in IMAGE_FILTER_OPTIONS if getattr(a, k) not in (None, False)]
    if image_only:
        raise KDMError(f"{', '.join(image_only)}: options of the image filter; {a.pairs} holds 2-D pairs")
    cfg = presets.validate(FilterConfig, {"near_duplicate_radius": a.near_duplicate_radius or 0.0,
                                          "blocklist_uri": a.blocklist,
                                          "blocklist_radius": 0.05 if a.blocklist_radius is None else a.blocklist_radius,
                                          "drop_nonfinite": not a.keep_nonfinite},
                           "pairs filter options")
    v, counts = filt.filter_pairs(a.pairs, cfg, a.out)
    summary(f"filtered {v}: kept {counts['kept']}, dropped " +
            ", ".join(f"{k}={n}" for k, n in counts.items() if k != "kept") + f" -> {a.out}")


IMAGE_FILTER_OPTIONS = ("dataset", "rule", "ratio_threshold", "neighbours", "absolute_threshold", "absolute_quantile",
                        "max_shift", "no_flip", "normalise", "candidates", "calibration_samples", "chunk_size",
                        "device", "keep_near_duplicates", "keep_memorised")


def cmd_pairs_filter_images(a) -> None:
    from storage_schemas.filter_images import ImageFilterConfig
    from pipeline import presets
    from pipeline.pairs import filter_images
    for flag, value in (("--near-duplicate-radius", a.near_duplicate_radius), ("--blocklist-radius", a.blocklist_radius)):
        if value is not None:
            raise KDMError(f"{flag} is an option of the 2-D filter; {a.pairs} holds images: the image filter decides "
                           f"copies with --rule / --ratio-threshold / --absolute-threshold")
    fields = {"blocklist_uri": a.blocklist, "drop_nonfinite": not a.keep_nonfinite, "flip": not a.no_flip,
              "near_duplicates": not a.keep_near_duplicates, "memorisation": not a.keep_memorised}
    for k in ("rule", "ratio_threshold", "neighbours", "absolute_threshold", "absolute_quantile", "max_shift",
              "normalise", "candidates", "calibration_samples", "chunk_size", "device"):
        if getattr(a, k) is not None:
            fields[k] = getattr(a, k)
    cfg = presets.validate(ImageFilterConfig, fields, "pairs filter options")
    res = filter_images.filter_image_pairs(a.pairs, cfg, a.out, dataset_uri=a.dataset, progress=not a.quiet,
                                           device=cfg.device)
    cal = res.get("calibration") or {}
    summary(f"filtered {res['version']}: kept {res['kept']}, dropped "
            + ", ".join(f"{k}={res[k]}" for k in filter_images.REASONS)
            + (f"; test images flagged {cal['test_flagged']}/{cal['test_images']}" if cal else "")
            + f"; report {res['report_uri']} -> {a.out}")


def cmd_pairs_info(a) -> None:
    from pipeline.storage import manifests
    manifests.check_pair_store(a.store)          # before Zarr: a wrong path or manifest fails fast
    from pipeline.storage.pairstore import PairStore
    s = PairStore.open(a.store)
    held = s.heldout()
    checked = s.verify() if a.verify else 0
    print(s.manifest.model_dump_json(indent=2, exclude={"chunk_digests"}))
    snap = s.manifest.snapshots
    summary(f"{a.store}: {s.manifest.split} {len(s)} pairs, version {s.version}"
            + (f", {snap.count} trajectory snapshots ({snap.axis})" if snap else "")
            + (f", held out {len(held)}" if held else "")
            + (f", content hash{'es' if held else ''} and all {checked} chunks verified"
               f"{' (train and held out)' if held else ''}" if a.verify else ""))


def cmd_train(a) -> None:
    from pipeline import presets
    if not (a.preset or a.config):
        raise KDMError("give --preset NAME or --config FILE (presets: " + ", ".join(presets.available("student")) + ")")
    cfg = presets.load("student", a.preset, a.config, a.set)
    if a.device:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"device": a.device})})
    from pipeline.storage import artifacts, manifests
    m = manifests.check_pair_store(a.pairs)       # before Zarr and torch: wrong inputs fail fast
    if tuple(m.sample_shape) != (cfg.model.dim,):
        raise KDMError(f"pairs {a.pairs} have sample shape {tuple(m.sample_shape)}; model.dim="
                       f"{cfg.model.dim} expects ({cfg.model.dim},): set model.dim to match the pairs")
    if artifacts.is_local(a.out):
        from pipeline.training.versions import run_version
        artifacts.check_run_version(artifacts.local_path(a.out) / artifacts.RUN_CONFIG, run_version(m.version, cfg),
                                    holds=f"{a.out} holds a run of another config/pairs")
    from pipeline.storage.pairstore import PairStore
    store = PairStore.open(a.pairs)
    if not a.dry_run:
        store.verify(heldout=False)              # every chunk and the content hash, before torch is imported
    from pipeline.training import train2d as train
    version = train.run_version(store.version, cfg)
    if a.dry_run:
        summary(f"dry run: would train {version} on {len(store)} pairs -> {a.out}\n{cfg.model_dump_json(indent=2)}")
        return
    train.train_student(a.pairs, cfg, a.out, progress=not a.quiet,
                        on_resume=lambda step: summary(f"resumed from its step-{step} checkpoint in {a.out}"))
    m = train.read_student_manifest(a.out)
    summary(f"student {m.version}: {m.steps_done} steps, {m.trainable_parameters} parameters, final losses "
            + ", ".join(f"{k}={v:.4g}" for k, v in m.final_losses.items()) + f" at {a.out}")


def cmd_sample(a) -> None:
    if a.num is not None and a.num < 1:
        raise KDMError(f"--num must be at least 1, got {a.num}")
    require_local_input(a.student, "student")
    from pipeline.storage import artifacts
    remote = not artifacts.is_local(a.out)      # --out is a URL: a local path or e.g. s3://bucket/samples.npy
    if remote:
        out = a.out if a.out.endswith(".npy") else a.out + ".npy"
        if a.out.endswith("/"):
            raise KDMError(f"--out {a.out} is a directory; give a file name such as {a.out}samples.npy")
    else:
        out = Path(a.out)
        if out.is_dir():
            raise KDMError(f"--out {a.out} is a directory; give a file name such as {out / 'samples.npy'}")
        if out.suffix != ".npy":
            out = out.with_name(out.name + ".npy")     # what np.save writes
    from pipeline.storage.manifests import read_student_manifest
    read_student_manifest(a.student)              # before torch: not a finished student run fails fast
    if a.noise is None and (a.num is None or a.seed is None):
        raise KDMError("give either --noise FILE.npy or both --num N and --seed S")
    from pipeline.evaluation.nfe import check_nfe
    check_nfe(a.nfe, read_student_manifest(a.student).nfe_trained, f"student {a.student}")
    import io
    import numpy as np
    from pipeline.evaluation import sample
    x0, _ = sample.sample(a.student, num=a.num, seed=a.seed, noise=a.noise, device=a.device, nfe=a.nfe)
    steps = f"{a.nfe}-NFE" if a.nfe > 1 else "one-step"
    if artifacts.exists(str(out)):  # samples are a function of (student, seed, num / noise): keep what differs
        try:
            same = np.array_equal(np.load(io.BytesIO(artifacts.read_bytes(str(out))), allow_pickle=False), x0)
        except (OSError, ValueError):
            same = False
        if not same:
            raise KDMError(f"--out {out} exists and holds other data than these samples; choose another --out "
                           f"(it is kept)")
        summary(f"{out} already holds these {len(x0)} {steps} samples {tuple(x0.shape)}")
        return
    if remote:
        buf = io.BytesIO()
        np.save(buf, x0)
        artifacts.write_bytes(out, buf.getvalue())
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        np.save(out, x0)
    summary(f"wrote {len(x0)} {steps} samples {tuple(x0.shape)} to {out}")


def cmd_evaluate(a) -> None:
    from pipeline.cli.distill import cmd_evaluate_image, is_image_student
    from pipeline.storage import manifests
    if is_image_student(a.student):
        return cmd_evaluate_image(a)
    manifests.check_pair_store(a.pairs)           # before torch: a wrong input fails fast
    from storage_schemas import Eval2DConfig
    from pipeline.storage import artifacts
    from pipeline.evaluation import evaluate2d as evaluate
    from pipeline import presets
    cfg = presets.validate(Eval2DConfig, presets.apply_sets({}, a.set), "evaluation options")
    out = a.out.rstrip("/")
    # --out is a URL (a local path or e.g. s3://bucket/prefix): DIR, or DIR/NAME.json for the report's name
    out_dir = out.rsplit("/", 1)[0] if out.endswith(".json") and "/" in out else ("." if out.endswith(".json") else out)
    # a report is replaced only by the evaluation of the same student and pairs: --out's, and the report.json
    # the evaluation writes beside the plots before it is renamed to --out's name
    beside = artifacts.join(out_dir, evaluate.REPORT)
    found = [u for u in dict.fromkeys([out if out.endswith(".json") else beside, beside]) if artifacts.exists(u)]
    for existing in found:
        from pipeline.storage.pairstore import PairStore
        from pipeline.storage.manifests import read_student_manifest
        try:
            old = evaluate.read_report(existing)
        except (KDMError, ValueError) as e:
            raise KDMError(f"--out {existing} exists and is not an evaluation report ({e}); choose another --out") \
                from None
        new = (read_student_manifest(a.student).version, PairStore.open(a.pairs).version)
        if (old.student_version, old.pairs_version) != new:
            raise KDMError(f"--out {existing} holds the report of student {old.student_version} on pairs "
                           f"{old.pairs_version}, not of {new[0]} on {new[1]}; choose another --out (it is kept)")
    local = artifacts.is_local(out_dir)
    created = local and not artifacts.local_path(out_dir).exists()
    if local:
        artifacts.local_path(out_dir).mkdir(parents=True, exist_ok=True)
    try:
        report = evaluate.evaluate_student(a.student, a.pairs, cfg, out_dir, teacher=a.teacher)
    except Exception:
        if created and not any(artifacts.local_path(out_dir).iterdir()):
            artifacts.local_path(out_dir).rmdir()      # a failed evaluation leaves no empty --out behind
        raise
    if out.endswith(".json") and out.rsplit("/", 1)[-1] != evaluate.REPORT:
        artifacts.write_json(out, report)
        if beside not in found:                    # the same student's report.json that was there stays
            fs, path = artifacts.url_to_fs(beside)
            fs.rm(path)
    print(evaluate.format_table(evaluate.metrics_table(report)))
    s, t = report.student, report.teacher_reference
    more = [p for p in report.frontier if p.model == "student" and p.nfe > 1]
    summary(f"student in-cell {s.in_cell_fraction:.4f} (teacher {t.in_cell_fraction:.4f}), SWD {s.swd:.4f} "
            f"(teacher {t.swd:.4f}), outliers {s.outlier_rate:.4f} (teacher {t.outlier_rate:.4f}), "
            f"pair MSE {s.pair_mse:.3g}{plus_minus(s.pair_mse_stderr)}"
            + "".join(f"; at {p.nfe} NFE SWD {p.metrics.swd:.4f}, in-cell {p.metrics.in_cell_fraction:.4f}"
                      for p in more) + f" -> {out}")


def cmd_report(a) -> None:
    from pipeline.storage import artifacts
    from pipeline.evaluation import evaluate2d as evaluate
    if a.report:
        rep = evaluate.read_report(a.report)
        where = a.report
    else:
        found = evaluate.find_reports(a.root)
        if not found:
            raise KDMError(f"no evaluation reports under {artifacts.join(a.root, 'evaluations')}; run `kdm distill` "
                           f"or the flow first")
        where, rep = found[-1]
    print(evaluate.format_table(evaluate.metrics_table(rep)))
    summary(f"report {where} (student {rep.student_version}, pairs {rep.pairs_version})")


def cmd_model_info(a) -> None:
    from pipeline.cli.model_info import format_model_info, model_info
    try:
        info = model_info(a.preset)
    except ValueError as e:
        raise KDMError(str(e)) from None
    print(format_model_info(info))


def cmd_presets(a) -> None:
    from pipeline import presets
    for fam in presets.FAMILIES:
        print(f"{fam}: {', '.join(presets.available(fam))}")
    summary(f"presets in {presets.CONFIG_DIR}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdm", description="Distill a diffusion / flow-matching teacher into a "
                                "one-step Koopman Distillation Model (KDM) student.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("teacher", help="teacher artifacts").add_subparsers(dest="sub", metavar="SUBCOMMAND")
    sp = add(t, "train", cmd_teacher_train, "train a flow-matching teacher on the checkerboard",
             "example: kdm teacher train --preset checkerboard --out runs/teacher")
    sp.add_argument("--preset", default=None)
    sp.add_argument("--config", default=None, help="YAML file of TeacherTrainConfig fields")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sp.add_argument("--out", required=True, help="teacher directory (any fsspec URL)")
    sp.add_argument("--dry-run", action="store_true")
    from pipeline.cli import registry as cli_registry
    cli_registry.add_commands(t)

    pr = sub.add_parser("pairs", help="pair stores: generate, import, filter, info").add_subparsers(
        dest="sub", metavar="SUBCOMMAND")
    sp = add(pr, "generate", cmd_pairs_generate, "integrate the teacher ODE from per-seed noise into a pair store",
             "example: kdm pairs generate --teacher runs/teacher --seeds 0-49999 --heldout-seeds 50000-59999 --out runs/pairs")
    sp.add_argument("--teacher", required=True)
    sp.add_argument("--seeds", required=True, help="inclusive range START-END, e.g. 0-49999")
    sp.add_argument("--heldout-seeds", default=None, help="inclusive range kept for evaluation (child group 'heldout')")
    sp.add_argument("--method", default="midpoint", help="euler | midpoint | heun (default midpoint)")
    sp.add_argument("--steps", type=int, default=20, help="ODE steps (default 20: 40 NFE with midpoint)")
    add_snapshot_options(sp)
    sp.add_argument("--chunk-size", type=int, default=10000)
    sp.add_argument("--device", default="cpu")
    sp.add_argument("--out", required=True, help="the Zarr group to write (arrays at its root)")
    sp.add_argument("--dry-run", action="store_true")
    sp = add(pr, "import", cmd_pairs_import, "import external pairs into a pair store (formats: "
             + ", ".join(IMPORT_FORMATS) + ")",
             "formats:\n" + "".join(f"  {k:<17} {v}\n" for k, v in IMPORT_FORMATS.items()) +
             "examples:\n"
             "  kdm pairs import checkerboard-fm-trajectories.npy --format kdm-trajectories --holdout 0.2 --out runs/official\n"
             "  kdm pairs import data/cifar10_uncond --format kdm-npz --order xT-first --holdout 0.01 --out runs/kdm-npz\n"
             "  kdm pairs import get/cifar_uncond --format get-pt --holdout 0.01 --out runs/get\n"
             "  kdm pairs import gen.npz --format npz --holdout 0 --out runs/pairs")
    sp.add_argument("src", help="the file (kdm-trajectories, npz) or folder (kdm-npz, get-pt) to import")
    sp.add_argument("--format", required=True, metavar="{" + ",".join(IMPORT_FORMATS) + "}", help="one of: "
                    + "; ".join(f"{k}: {v}" for k, v in IMPORT_FORMATS.items()))
    sp.add_argument("--order", default=None, choices=["xT-first", "x0-first"],
                    help="kdm-npz only (required there): which end of arr_0/endpoints is x_T; xT-first for the "
                         "official CIFAR-10 unconditional training set, x0-first for every other official set")
    sp.add_argument("--noise-scale", type=float, default=None,
                    help="image formats (kdm-npz, get-pt, npz): the x_T scale of the result (default 80, EDM's "
                         "sigma_max); get-pt latents are multiplied by it, kdm-npz and npz x_T are stored as found")
    sp.add_argument("--snapshots", default=None, metavar="all|I,J,...",
                    help="kdm-trajectories: keep intermediate trajectory entries as snapshots (array x_t): 'all' or "
                         "their indices (0 is x_T, T-1 is x_0), for multi-step students (model.nfe_train)")
    sp.add_argument("--holdout", type=float, required=True, help="fraction held out for evaluation (may be 0)")
    sp.add_argument("--split-seed", type=int, default=0)
    sp.add_argument("--chunk-size", type=int, default=10000)
    sp.add_argument("--out", required=True)
    sp = add(pr, "filter", cmd_pairs_filter,
             "drop non-finite, duplicate-seed, duplicate, memorised, blocklisted and near-duplicate pairs",
             "examples:\n"
             "  kdm pairs filter --pairs runs/pairs --blocklist secret.npy --out runs/pairs-filtered   (2-D pairs)\n"
             "  kdm pairs filter --pairs runs/cifar-pairs --dataset runs/cifar10 --out runs/cifar-filtered\n"
             "  kdm pairs filter --pairs runs/cifar-pairs --dataset runs/cifar10 --rule gu --device cuda \\\n"
             "      --blocklist private-images/ --out runs/cifar-filtered-gu\n"
             "  kdm pairs filter --pairs runs/cifar-pairs --dataset runs/cifar10 --rule absolute "
             "--absolute-quantile 0.001 --out OUT\n"
             "Image stores ((C, H, W) samples) use the image filter: copies of the --dataset's training images "
             "('memorised'),\nof --blocklist images and of earlier pairs ('near_duplicate') are found by pixel "
             "distance minimised over\nflip and shifts; OUT/filter_report/ holds report.json and grid.png.")
    sp.add_argument("--pairs", required=True)
    sp.add_argument("--near-duplicate-radius", type=float, default=None, help="2-D: L2 radius (default 0: off)")
    sp.add_argument("--blocklist", default=None,
                    help="2-D: .npy of points (M, *sample_shape); images: .npy/.npz (N, C, H, W) or a folder of images")
    sp.add_argument("--blocklist-radius", type=float, default=None, help="2-D: L2 radius (default 0.05)")
    sp.add_argument("--keep-nonfinite", action="store_true")
    sp.add_argument("--out", required=True)
    g = sp.add_argument_group("image pairs (defaults: storage_schemas.filter_images.ImageFilterConfig)")
    g.add_argument("--dataset", default=None, help="the teacher's dataset (kdm dataset prepare): train split = "
                                                   "memorisation reference, test split = calibration")
    g.add_argument("--rule", default=None, choices=("carlini", "gu", "absolute"),
                   help="carlini: d1 / mean of k nearest < threshold (default); gu: d1/d2 < threshold; absolute: "
                        "d1 below a distance calibrated on test -> train")
    g.add_argument("--ratio-threshold", type=float, default=None, help="carlini / gu threshold (default 1/3)")
    g.add_argument("--neighbours", type=int, default=None, help="carlini: k (default 50)")
    g.add_argument("--absolute-threshold", type=float, default=None, help="absolute: RMS distance in [0, 1] units")
    g.add_argument("--absolute-quantile", type=float, default=None,
                   help="absolute without a threshold: quantile of test -> train distances (default 0.001)")
    g.add_argument("--max-shift", type=int, default=None, help="pixels searched each way (default 2)")
    g.add_argument("--no-flip", action="store_true", help="do not search horizontal flips")
    g.add_argument("--normalise", default=None, choices=("none", "mean", "mean-std"),
                   help="per-image normalisation before comparing (default mean)")
    g.add_argument("--candidates", type=int, default=None,
                   help="descriptor candidates checked exactly per query (default 64; 0 = exhaustive, for GPUs)")
    g.add_argument("--calibration-samples", type=int, default=None, help="test images searched (default 10000)")
    g.add_argument("--chunk-size", type=int, default=None, help="pairs per step (default 4096)")
    g.add_argument("--device", default=None, help="cpu | cuda (default cpu)")
    g.add_argument("--keep-near-duplicates", action="store_true", help="skip the near-duplicate test")
    g.add_argument("--keep-memorised", action="store_true", help="report copies of training images, drop none")
    sp = add(pr, "info", cmd_pairs_info, "print a pair store's manifest", "example: kdm pairs info runs/pairs --verify")
    sp.add_argument("store")
    sp.add_argument("--verify", action="store_true", help="check every chunk of every array of every split "
                    "(held-out included) against the manifest, and the content hashes")

    sp = add(sub, "train", cmd_train, "train a KDM student on a pair store (resumes an interrupted run)",
             "example: kdm train --pairs runs/pairs --preset checkerboard --set train.steps=2000 --out runs/student")
    sp.add_argument("--pairs", required=True)
    sp.add_argument("--preset", default=None)
    sp.add_argument("--config", default=None, help="YAML file of StudentRunConfig fields")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sp.add_argument("--device", default=None, help="cpu | cuda (default from the config)")
    sp.add_argument("--out", required=True, help="run directory")
    sp.add_argument("--dry-run", action="store_true")

    sp = add(sub, "sample", cmd_sample, "samples from a student (one step, or --nfe N for a multi-step student)",
             "examples: kdm sample --student runs/student --num 1000 --seed 0 --out x0.npy\n"
             "          kdm sample --student runs/student --noise xT.npy --out x0.npy\n"
             "          kdm sample --student runs/multistep --num 1000 --seed 0 --nfe 2 --out x0.npy")
    sp.add_argument("--student", required=True)
    sp.add_argument("--num", type=int)
    sp.add_argument("--seed", type=int)
    sp.add_argument("--noise", help=".npy of x_T (N, D)")
    sp.add_argument("--nfe", type=int, default=1, help="network evaluations (default 1: the one-step map); a "
                    "multi-step student samples with any NFE it was trained for (its model.nfe_train)")
    sp.add_argument("--device", default="cpu")
    sp.add_argument("--out", required=True)

    from pipeline.cli import distill as cli_distill_image
    sp = add(sub, "evaluate", cmd_evaluate, "evaluate a student against the held-out split of its pairs",
             "example: kdm evaluate --student runs/student --pairs runs/pairs --out runs/eval/report.json\n"
             "image student: kdm evaluate --student runs/student --pairs runs/pairs --dataset runs/cifar10 "
             "--extractor runs/extractor --out runs/eval")
    sp.add_argument("--student", required=True)
    sp.add_argument("--pairs", required=True)
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="Eval2DConfig field (image students: ImageEvalStageConfig field), e.g. nfe=[1,2,4] or "
                         "teacher_nfe=[1,2,4,8] (with --teacher)")
    sp.add_argument("--teacher", default=None, help="2-D: the teacher run whose sampler teacher_nfe cuts short")
    sp.add_argument("--out", required=True, help="REPORT.json (plots beside it) or a directory (image students: "
                                                 "a directory)")
    cli_distill_image.add_evaluate_options(sp)

    sp = add(sub, "report", cmd_report, "print the metrics table of an evaluation report",
             "example: kdm report --root artifacts")
    sp.add_argument("--root", default="artifacts")
    sp.add_argument("--report", default=None)

    mi = sub.add_parser("model", help="model presets").add_subparsers(dest="sub", metavar="SUBCOMMAND")
    sp = add(mi, "info", cmd_model_info, "parameter counts of an image KDM preset",
             "example: kdm model info --preset cifar10-uncond")
    sp.add_argument("--preset", required=True)

    add(sub, "presets", cmd_presets, "list the presets under configs/")
    from pipeline.cli import metrics as cli_eval
    from pipeline.cli import images as cli_images
    from pipeline.cli import train_image as cli_train_image
    cli_distill_image.add_commands(sub)
    cli_images.add_commands(sub)
    cli_eval.add_commands(sub)
    cli_train_image.add_commands(sub)
    return p


SEED_OPTIONS = ("--seeds", "--heldout-seeds")


def _join_negative_seed_values(argv: list[str]) -> list[str]:
    """``--seeds -5-10`` as ``--seeds=-5-10``: argparse would take the value for an option and say only
    "expected one argument"; joined, the seed-range check explains what is wrong."""
    out: list[str] = []
    it = iter(range(len(argv)))
    for i in it:
        if argv[i] in SEED_OPTIONS and i + 1 < len(argv) and argv[i + 1][:2].startswith("-") \
                and argv[i + 1][1:2].isdigit():
            out.append(f"{argv[i]}={argv[i + 1]}")
            next(it, None)
        else:
            out.append(argv[i])
    return out


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(_join_negative_seed_values(list(sys.argv[1:] if argv is None else argv)))
    if not getattr(a, "fn", None):
        parser.print_help()
        return 2
    try:
        a.fn(a)
    except KDMError as e:
        print(f"kdm {a.command}: error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:   # argument parsing of typed values (e.g. seed ranges)
        print(f"kdm {a.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:      # read-only or full disks, a file where a directory belongs, ...
        where = (f" ({e.filename})" if getattr(e, "filename", None) else
                 f" (writing {a.out})" if getattr(a, "out", None) else "")
        print(f"kdm {a.command}: error: {e.strerror or e}{where}; check that the path is writable, has free space "
              f"and is what the command expects, then rerun (finished work is kept)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
