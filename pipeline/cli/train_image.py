"""``kdm train-image``: the config and the inputs are checked first; torch and the image stack are imported
only to train."""
from __future__ import annotations

import argparse
import os

from storage_schemas.kdm_image import IMAGE_PRESETS

from pipeline.errors import KDMError


def cmd_train_image(a) -> None:
    from storage_schemas.kdm_image import ImageTrainConfig, KDMImageConfig
    from pipeline import presets
    from pipeline.storage import artifacts, manifests
    if bool(a.preset) == bool(a.config):
        raise KDMError("give either --preset NAME or --config FILE (an image student config: preset, model, train)")
    if a.config:
        raw, source = presets.raw_config("student", None, a.config)
        unknown = set(raw) - {"preset", "model", "train"}
        if unknown or "model" not in raw:
            raise KDMError(f"{source} must hold 'model' (KDMImageConfig), 'train' (ImageTrainConfig) and optionally "
                           f"'preset' (the name recorded in the manifest); got keys {sorted(raw)}")
        preset = str(raw.get("preset", "custom"))
        base = {"model": raw["model"], "train": raw.get("train", {})}
    else:
        if a.preset not in IMAGE_PRESETS:
            raise KDMError(f"unknown image preset {a.preset!r}; valid: {', '.join(IMAGE_PRESETS)}")
        preset, source = a.preset, f"image preset {a.preset!r}"
        base = {"model": IMAGE_PRESETS[a.preset].model_dump(mode="json"), "train": {}}
    data = presets.apply_sets(base, a.set)
    unknown = set(data) - {"model", "train"}
    if unknown:
        raise KDMError(f"--set keys must start with model. or train., got {sorted(unknown)}")
    model_cfg = presets.validate(KDMImageConfig, data["model"], f"{source} (model)")
    train_cfg = presets.validate(ImageTrainConfig, data["train"], f"{source} (train)")
    pairs = manifests.check_pair_store(a.pairs)          # before torch: a wrong input fails fast
    if artifacts.is_local(a.out):
        from pipeline.training.versions import image_run_version
        artifacts.check_run_version(artifacts.local_path(a.out) / artifacts.RUN_CONFIG,
                                    image_run_version(pairs.version, model_cfg, train_cfg),
                                    holds=f"{a.out} holds a run of another config/pairs")
    from pipeline.training.image_train import image_run_version, read_image_student_manifest, train_image_student
    if a.dry_run:
        v = image_run_version(pairs.version, model_cfg, train_cfg)
        print(f"dry run: would train {v} -> {a.out}\n{model_cfg.model_dump_json(indent=2)}\n"
              f"{train_cfg.model_dump_json(indent=2)}", flush=True)
        return
    v = train_image_student(a.pairs, model_cfg, train_cfg, a.out, a.device, preset=preset,
                            progress=not a.quiet, max_steps=a.max_steps,
                            on_resume=lambda step: print(f"resumed from its step-{step} checkpoint in {a.out}",
                                                         flush=True))
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if artifacts.committed(a.out):
        m = read_image_student_manifest(a.out)
        print(f"image student {m.version}: {m.steps_done} steps ({m.nonfinite_steps} skipped as non-finite), "
              f"{m.trainable_parameters} parameters, EMA weights at {a.out}/{m.weights_file}", flush=True)
    else:
        print(f"image student {v}: stopped at step {a.max_steps} with a checkpoint in {a.out}; run the same "
              f"command without --max-steps to continue", flush=True)


def add_commands(subparsers) -> None:
    """Add ``train-image`` to the ``kdm`` sub-command parser (``argparse`` subparsers action)."""
    sp = subparsers.add_parser(
        "train-image", help="train an image KDM student on a pair store (resumes; torchrun for several GPUs)",
        description="Train an image KDM student (bf16, TF32, channels_last, fused Adam, EMA; resumable). "
                    "Several GPUs: torchrun --nproc_per_node N -m pipeline.cli train-image ...",
        epilog="example: kdm train-image --pairs runs/cifar-pairs --preset cifar10-uncond "
               "--set model.distance=pseudo-huber --set train.steps=800000 --out runs/cifar-student\n"
               "one GPU replays the whole step as a CUDA graph by default (--set train.cuda_graphs=false: "
               "eager); fastest with it: --set train.channels_last=false (the CIFAR-10 distill presets' setting)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.set_defaults(fn=cmd_train_image)
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    sp.add_argument("--pairs", required=True)
    sp.add_argument("--preset", default=None, help=", ".join(IMAGE_PRESETS) + " (or --config)")
    sp.add_argument("--config", default=None, help="YAML/JSON file with model (KDMImageConfig), train "
                    "(ImageTrainConfig) and preset (the name recorded in the manifest), e.g. the student stage's "
                    "config; --set applies on top")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="model.FIELD=VALUE (KDMImageConfig) or train.FIELD=VALUE (ImageTrainConfig)")
    sp.add_argument("--device", default=None, help="cpu | cuda (default: train.device, cuda)")
    sp.add_argument("--max-steps", type=int, default=None, help="stop (with a checkpoint) after this many steps")
    sp.add_argument("--out", required=True, help="run directory")
    sp.add_argument("--dry-run", action="store_true")
