"""``kdm train-image``: the argument parser only; torch and the image stack are imported when it runs."""
from __future__ import annotations

import argparse

from storage_schemas.kdm_image import IMAGE_PRESETS


def cmd_train_image(a) -> None:
    from pipeline.training.image_train import cmd_train_image as run
    run(a)


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
