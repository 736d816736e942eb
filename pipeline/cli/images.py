"""``kdm`` commands for image datasets, EDM teachers and image pair stores.

Wire them in with ``add_commands(sub)`` after the built-in commands of pipeline/cli.py (it adds
sub-commands to the existing ``teacher`` and ``pairs`` groups and creates ``dataset``):

  kdm dataset prepare [ARCHIVE] --out URL          ImageFolder tar.gz or CIFAR-10 python release -> Zarr dataset
                                                   (no ARCHIVE: cifar10 from $KDM_DATA_DIR, downloaded when absent)
  kdm dataset info URL [--verify]
  kdm teacher bootstrap --preset cifar10-mini --dataset URL --out DIR [--device cuda]
  kdm teacher import-edm PKL --allow-pickle --sha256 HEX --out DIR
  kdm pairs generate-images --teacher DIR --seeds 0-49999 --heldout-seeds 50000-59999 --out URL
  kdm pairs import-images SRC --format kdm-npz|get-pt [--order xT-first] --holdout 0.01 --out URL
  kdm pairs export --pairs URL --format kdm-npz --order x0-first --out DIR
"""
from __future__ import annotations

import argparse
import sys

from pipeline.cli.common import add_command as add
from pipeline.cli.common import (add_snapshot_options, heldout_count, open_pairs, pairs_dry_run, pairs_generate_config,
                                 pairs_import_config, require_local_input, snapshot_steps_option, summary)
from pipeline.errors import KDMError

EXAMPLES = """\
examples (CIFAR-10 teacher and pairs):
  kdm dataset prepare --out runs/cifar10          (cifar10 from $KDM_DATA_DIR, downloaded there when absent)
  kdm dataset prepare cifar-10-python.tar.gz --out runs/cifar10
  kdm teacher bootstrap --preset cifar10-mini --dataset runs/cifar10 --out runs/teacher-cifar10 --device cuda
  kdm pairs generate-images --teacher runs/teacher-cifar10 --seeds 0-49999 --heldout-seeds 50000-59999 \\
      --device cuda --batch 1000 --out runs/pairs-cifar10
  torchrun --nproc_per_node 4 -m pipeline.cli pairs generate-images ...   (N workers fill one store)
"""


def cmd_dataset_prepare(a) -> None:
    from pipeline.data import sources
    if a.archive:
        require_local_input(a.archive, "archive")
    archive = sources.resolve(a.name, a.archive, progress=not a.quiet,
                              log=lambda m: print(m, file=sys.stderr)).archive
    from pipeline.data.datasets import prepare_image_dataset
    m = prepare_image_dataset(archive, a.out, chunk_size=a.chunk_size, progress=not a.quiet)
    counts = ", ".join(f"{s} {i.count}" for s, i in m.splits.items())
    summary(f"dataset {m.version}: {counts} images {'x'.join(map(str, m.image_shape))}, {m.num_classes} classes, "
            f"prepared in {m.prepare_seconds:.1f} s at {a.out}; source: {m.source.description} "
            f"({m.source.checksum})")


def cmd_dataset_info(a) -> None:
    from pipeline.data.datasets import open_image_dataset
    ds = open_image_dataset(a.dataset)
    if a.verify:
        ds.verify()
    print(ds.manifest.model_dump_json(indent=2))
    summary(f"{a.dataset}: dataset {ds.version}, " + ", ".join(f"{s} {i.count}" for s, i in ds.manifest.splits.items())
            + (", content hash verified" if a.verify else ""))


def cmd_teacher_bootstrap(a) -> None:
    from pipeline.storage import manifests
    manifests.check_dataset(a.dataset)            # before torch: a wrong path fails fast
    from pipeline.teachers import bootstrap as tb
    from pipeline.data.datasets import open_image_dataset
    cfg = tb.load_edm_teacher_config(a.preset, a.config, a.set)
    if a.device:
        cfg = cfg.model_copy(update={"device": a.device})
    ds = open_image_dataset(a.dataset)
    version = tb.bootstrap_version(ds.manifest.content_hash, cfg)
    if a.dry_run:
        summary(f"dry run: would train EDM teacher {version} on {ds.manifest.splits['train'].count} images "
                f"-> {a.out}\n{cfg.model_dump_json(indent=2)}")
        return
    m = tb.train_edm_teacher(a.dataset, cfg, a.out, progress=not a.quiet)
    summary(f"teacher {m.id} (edm, {m.model.precond} precond, final loss {m.final_loss:.4f}) at {a.out} "
            f"sha256 {m.weights_sha256[:16]}")


def cmd_teacher_import_edm(a) -> None:
    from pipeline.teachers.edm_pickle import import_edm_pickle
    m = import_edm_pickle(a.pickle, a.out, allow_pickle=a.allow_pickle, sha256=a.sha256, key=a.key)
    for w in m.source.source_warnings:
        print(f"warning: {w}", file=sys.stderr)
    summary(f"teacher {m.id} ({m.source.class_name}, {m.model.img_resolution}x{m.model.img_resolution}, "
            f"label_dim {m.model.label_dim}) imported from {a.pickle} at {a.out}; network source: "
            f"{m.source.network_source or 'not checked'}")


# Options of `pairs generate-images` that --config replaces, with their defaults when it is not given.
GENERATE_IMAGES_DEFAULTS = {"seeds": None, "heldout_seeds": None, "steps": 18, "sigma_min": 0.002,
                            "sigma_max": 80.0, "rho": 7.0, "precision": "fp32", "chunk_size": 2500, "device": "cuda"}


def _generate_images_config(a):
    """The PairsGenerateConfig of `pairs generate-images`: --config FILE, or the seed / sampler options."""
    from storage_schemas import PairsGenerateConfig
    from pipeline import presets
    given = [k for k in (*GENERATE_IMAGES_DEFAULTS, "snapshots", "snapshot_steps") if getattr(a, k) is not None]
    if a.config:
        if given:
            raise KDMError(f"--config {a.config} holds the whole pairs config; drop "
                           + ", ".join("--" + k.replace("_", "-") for k in given))
        data, source = presets.raw_config("pairs", None, a.config)
        return presets.validate(PairsGenerateConfig, data, source)
    if a.seeds is None:
        raise KDMError("give --seeds START-END (or --config FILE with a PairsGenerateConfig)")
    for k, v in GENERATE_IMAGES_DEFAULTS.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    sampler = {"kind": "edm-heun", "steps": a.steps, "noise_scale": a.sigma_max, "sigma_min": a.sigma_min,
               "rho": a.rho}
    if a.precision != "fp32":
        sampler["precision"] = a.precision
    return pairs_generate_config(a, sampler | snapshot_steps_option(a, a.steps), "pairs generate-images options")


def cmd_pairs_generate_images(a) -> None:
    from pipeline.pairs import generate
    from pipeline.storage.manifests import read_teacher_manifest
    cfg = _generate_images_config(a)
    v = generate.pairs_version(read_teacher_manifest(a.teacher).id, cfg)
    held = heldout_count(cfg)
    if a.dry_run:
        pairs_dry_run(cfg, v, a.out)
        return
    v = generate.generate_pairs(a.teacher, cfg, a.out, progress=not a.quiet, rank=a.rank, world_size=a.world_size,
                                batch_size=a.batch, compile=a.compile)
    rank, ws = generate.resolve_workers(a.rank, a.world_size)
    if rank == 0:
        snaps = cfg.sampler.snapshot_steps
        summary(f"pairs {v}: {len(cfg.seeds)} train + {held} held out ({cfg.sampler.nfe} NFE edm-heun"
                + (f", {len(snaps)} trajectory snapshots after steps {', '.join(map(str, snaps))}" if snaps else "")
                + f") at {a.out}")
    else:
        summary(f"pairs {v}: worker {rank}/{ws} finished its shards; rank 0 commits {a.out}")


def cmd_pairs_import_images(a) -> None:
    from pipeline.pairs import importer
    cfg = pairs_import_config(a, "pairs import-images options", order=a.order, noise_scale=a.noise_scale)
    v = importer.import_pairs(a.src, cfg, a.out)
    s, held = open_pairs(a.out)
    summary(f"imported {v}: {len(s)} train + {held} held out from {a.src} "
            f"(x_T_scale {s.manifest.x_T_scale:g}, {s.manifest.num_classes} classes) at {a.out}")


def cmd_pairs_export(a) -> None:
    from pipeline.pairs.importer import export_kdm_npz
    if a.format != "kdm-npz":
        raise KDMError(f"export format {a.format!r} is not supported (kdm-npz)")
    n = export_kdm_npz(a.pairs, a.out, order=a.order, split=a.split, dtype=a.dtype)
    summary(f"exported {n} pairs ({a.split}, {a.order}, {a.dtype}) as path<i>.npz files to {a.out}")


def _subparsers_of(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def _group(sub, name: str, help_: str, aliases: tuple[str, ...] = ()):
    """The sub-command group ``name`` of the top-level parser, created when missing."""
    parser = sub.choices.get(name)
    if parser is None:
        return sub.add_parser(name, help=help_, aliases=list(aliases)).add_subparsers(dest="sub", metavar="SUBCOMMAND")
    action = _subparsers_of(parser)
    if action is None:
        raise RuntimeError(f"`kdm {name}` exists but has no sub-commands")
    return action


def add_commands(sub) -> None:
    """Register the image commands on the top-level sub-parsers of ``kdm`` (pipeline/cli.py)."""

    ds = _group(sub, "dataset", "image datasets: prepare, info (alias: data)", aliases=("data",))
    sp = add(ds, "prepare", cmd_dataset_prepare, "turn an ImageFolder tar.gz (train|test/<class>/<file>) or "
             "CIFAR-10's python release into a versioned Zarr dataset; without ARCHIVE, the dataset --name from "
             "$KDM_DATA_DIR (default ~/.cache/kdm/data), downloaded there when absent",
             "examples:\n  kdm dataset prepare --out runs/cifar10\n"
             "  kdm dataset prepare cifar-10-python.tar.gz --out runs/cifar10")
    sp.add_argument("archive", nargs="?", default=None,
                    help="an explicit archive (default: the dataset --name, found or downloaded)")
    sp.add_argument("--name", default="cifar10", choices=("cifar10",), help="the dataset by name (default cifar10)")
    sp.add_argument("--out", required=True, help="the Zarr group to write (any fsspec URL)")
    sp.add_argument("--chunk-size", type=int, default=10000, help="images per Zarr chunk")
    sp = add(ds, "info", cmd_dataset_info, "print a dataset's manifest", "example: kdm dataset info runs/cifar10 --verify")
    sp.add_argument("dataset")
    sp.add_argument("--verify", action="store_true", help="recompute the content hashes")

    t = _group(sub, "teacher", "teacher artifacts")
    sp = add(t, "bootstrap", cmd_teacher_bootstrap, "train an EDM teacher (SongUNet + EDM preconditioning) on a "
             "prepared image dataset; resumes an interrupted run", EXAMPLES)
    sp.add_argument("--preset", default=None, help="configs/teacher/<preset>.yaml of kind edm-teacher "
                    "(cifar10-mini, cifar10-edm)")
    sp.add_argument("--config", default=None, help="YAML file of EDMTeacherTrainConfig fields")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sp.add_argument("--dataset", required=True, help="a dataset written by kdm dataset prepare")
    sp.add_argument("--device", default=None, help="cpu | cuda (default from the config: cuda)")
    sp.add_argument("--out", required=True, help="teacher directory")
    sp.add_argument("--dry-run", action="store_true")
    sp = add(t, "import-edm", cmd_teacher_import_edm, "convert a released EDM network pickle (edm-*.pkl) into a "
             "teacher artifact, without EDM's code", "example: kdm teacher import-edm edm-cifar10-32x32-uncond-vp.pkl "
             "--allow-pickle --sha256 <hex> --out runs/teacher-edm")
    sp.add_argument("pickle")
    sp.add_argument("--allow-pickle", action="store_true", help="consent to parse this pickle (needs --sha256)")
    sp.add_argument("--sha256", default=None, help="the file's expected sha256 (an unpinned pickle is refused)")
    sp.add_argument("--key", default="ema", help="entry of the pickled dict holding the network (default ema)")
    sp.add_argument("--out", required=True)

    pr = _group(sub, "pairs", "pair stores")
    sp = add(pr, "generate-images", cmd_pairs_generate_images, "EDM Heun pairs (x_T = sigma_max * eps, x_0) from "
             "an EDM teacher, sharded over RANK/WORLD_SIZE workers", EXAMPLES)
    sp.add_argument("--teacher", required=True)
    sp.add_argument("--config", default=None, help="YAML/JSON file of a whole PairsGenerateConfig (seeds, "
                    "heldout_seeds, sampler, chunk_size, device) instead of the options --seeds ... --device")
    sp.add_argument("--seeds", default=None, help="inclusive range START-END, e.g. 0-49999 (required without "
                    "--config)")
    sp.add_argument("--heldout-seeds", default=None)
    sp.add_argument("--steps", type=int, default=None, help="Heun noise levels (default 18 = 35 NFE at 32x32; EDM "
                    "used 40 at 64x64)")
    sp.add_argument("--sigma-min", type=float, default=None, help="default 0.002")
    sp.add_argument("--sigma-max", type=float, default=None, help="x_T scale and first noise level (default 80)")
    sp.add_argument("--rho", type=float, default=None, help="default 7")
    sp.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                    help="fp32 (default) = EDM's generate.py (float64 Heun state); fp16/bf16 = the fast path "
                         "(reduced-precision network, float32 state; recorded in the store's version). "
                         "BENCHMARKS.md: fp16 + --compile 2.5x, mean drift 1e-4")
    sp.add_argument("--compile", action="store_true", help="torch.compile the teacher network (about 35 s once)")
    add_snapshot_options(sp)
    sp.add_argument("--chunk-size", type=int, default=None, help="pairs per Zarr chunk and per shard of work "
                    "(default 2500)")
    sp.add_argument("--batch", type=int, default=None, help="seeds per sampler call (default: a whole shard)")
    sp.add_argument("--device", default=None, help="cpu | cuda (default cuda)")
    sp.add_argument("--rank", type=int, default=None, help="this worker (default: $RANK, else 0)")
    sp.add_argument("--world-size", type=int, default=None, help="number of workers (default: $WORLD_SIZE, else 1)")
    sp.add_argument("--out", required=True)
    sp.add_argument("--dry-run", action="store_true")
    sp = add(pr, "import-images", cmd_pairs_import_images, "import official KDM per-pair .npz folders or GET's .pt "
             "shards", "examples: kdm pairs import-images data/cifar10_uncond --format kdm-npz --order xT-first "
             "--holdout 0.01 --out runs/official\n"
             "          kdm pairs import-images get/cifar_uncond --format get-pt --holdout 0.01 --out runs/get")
    sp.add_argument("src", help="folder of path<i>.npz files (kdm-npz) or with latent/ and image/ (get-pt)")
    sp.add_argument("--format", required=True, choices=["kdm-npz", "get-pt"])
    sp.add_argument("--order", default=None, choices=["xT-first", "x0-first"],
                    help="kdm-npz only (required): xT-first for the official CIFAR-10 unconditional training set")
    sp.add_argument("--noise-scale", type=float, default=None,
                    help="x_T scale of the result (default 80; get-pt latents are multiplied by it)")
    sp.add_argument("--holdout", type=float, required=True, help="fraction held out for evaluation (may be 0)")
    sp.add_argument("--split-seed", type=int, default=0)
    sp.add_argument("--chunk-size", type=int, default=2500)
    sp.add_argument("--out", required=True)
    sp = add(pr, "export", cmd_pairs_export, "write a pair store as the official KDM per-pair .npz files",
             "example: kdm pairs export --pairs runs/pairs --format kdm-npz --order xT-first --out runs/npz")
    sp.add_argument("--pairs", required=True)
    sp.add_argument("--format", default="kdm-npz")
    sp.add_argument("--order", required=True, choices=["x0-first", "xT-first"],
                    help="xT-first for the official CIFAR-10 unconditional training loader, else x0-first")
    sp.add_argument("--split", default="train", choices=["train", "heldout"])
    sp.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    sp.add_argument("--out", required=True)
