#!/usr/bin/env python
"""Why an adversarial term can take over a perceptual student: gradient scales of each loss term, on the CPU.

    python bench/adversarial_scale.py --archive cifar10-jpeg.tar.gz --out docs/bench/adversarial-scale.json

The student's generator loss is d(x_push, x_0) + ... + w * BCE(D(x_push), 1); what moves the student is each
term's gradient with respect to its output x_push. This measures, on real CIFAR-10 images x_0 and "student
outputs" x_push made from them the way an early one-step student looks (a blurred average: box blur of
``--blur`` passes, plus a little noise), the gradient norms ||d term / d x_push|| of

* the reconstruction distances of the presets: pseudo-Huber (c = 0.03) and ``lpips-own`` (a perceptual
  network trained here on the train images, at a small width so that it trains in a minute);
* the non-saturating generator term BCE(D(x_push), 1) of the image engine's discriminator
  (``models.discriminator``: the official architecture), at several stages of D's training: D is trained
  with the engine's loss and optimiser (Adam, lr 3e-4, betas 0.9 / 0.999) to separate x_0 from x_push, and
  the term is measured as the engine computes it (D in train mode on the fake batch alone).

It prints, per D step, ``w_equal = ||grad d|| / ||grad adv||``: the adversarial weight at which both terms pull
equally. A run's weight far above w_equal hands the student to D (mode collapse: precision up, recall to 0);
far below, D has no effect. One table per distance; all numbers come from this script's run.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def load_images(archive: str, n: int, split: str = "train", every: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """n images (uint8 N, 3, 32, 32) and class ids from an ImageFolder tar(.gz), read in one pass (every
    ``every``-th file of the split; class ids in sorted name order of the classes met)."""
    from PIL import Image
    xs, names = [], []
    seen = 0
    with tarfile.open(archive, "r|*") as tf:
        for m in tf:
            if not (m.isfile() and f"{split}/" in m.name):
                continue
            seen += 1
            if seen % every:
                continue
            img = Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")
            xs.append(np.asarray(img).transpose(2, 0, 1))
            names.append(Path(m.name).parent.name)
            if len(xs) == n:
                break
    classes = sorted(set(names))
    order = np.random.default_rng(0).permutation(len(xs))
    return np.stack(xs)[order], np.asarray([classes.index(c) for c in names], dtype=np.int64)[order]


def blur(x: torch.Tensor, passes: int) -> torch.Tensor:
    for _ in range(passes):
        x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return x


def grad_norm(loss_fn, x: torch.Tensor) -> float:
    """Mean over the batch of the per-sample gradient norm of loss_fn(x) (a batch mean) times the batch size."""
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_fn(x), x)
    return float(g.flatten(1).norm(dim=1).mean() * x.shape[0])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archive", required=True, help="CIFAR-10 ImageFolder tar(.gz)")
    p.add_argument("--out", default=None, help="write the JSON record here")
    p.add_argument("--train-images", type=int, default=5000, help="images the perceptual network trains on")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--blur", type=int, default=2, help="box-blur passes of the 'student output'")
    p.add_argument("--d-steps", default="0,10,50,200,500", help="D training steps at which to measure")
    p.add_argument("--pnet-width", type=int, default=16)
    p.add_argument("--pnet-epochs", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    from models.discriminator import Discriminator, discriminator_loss, generator_adversarial_loss
    from models.distances import make_distance
    from pipeline.training import perceptual as pt
    from storage_schemas.perceptual import PerceptualNetTrainConfig

    t0 = time.time()
    x_u8, y = load_images(a.archive, a.train_images + 2 * a.batch)
    x_tr, y_tr = x_u8[:a.train_images], y[:a.train_images]
    with tempfile.TemporaryDirectory() as d:
        cfg = PerceptualNetTrainConfig(width=a.pnet_width, epochs=a.pnet_epochs, batch_size=256)
        m = pt.train_perceptual_net_arrays(x_tr, y_tr, cfg, str(Path(d, "pnet")), device="cpu", progress=False)
        own = pt.load_perceptual_distance(str(Path(d, "pnet")), "cpu")
    print(f"perceptual network {m.id}: {m.train_seconds:.0f} s", flush=True)
    distances = {"pseudo-huber": make_distance("pseudo-huber", 0.03), "lpips-own": own}

    x0 = torch.from_numpy(x_u8[a.train_images:]).float() / 127.5 - 1
    g = torch.Generator().manual_seed(1)
    fake = (blur(x0, a.blur) + 0.02 * torch.randn(x0.shape, generator=g)).clamp(-1, 1)
    real_b, fake_b = x0[:a.batch], fake[:a.batch]
    eval_real, eval_fake = x0[a.batch:2 * a.batch], fake[a.batch:2 * a.batch]

    rec = {name: grad_norm(lambda x, f=f: f(x, eval_real).mean(), eval_fake) for name, f in distances.items()}
    values = {name: float(f(eval_fake, eval_real).mean()) for name, f in distances.items()}
    print(f"reconstruction terms at the blurred outputs: values {values}, gradient norms {rec}", flush=True)

    disc = Discriminator(3)
    opt = torch.optim.Adam(disc.parameters(), lr=3e-4, betas=(0.9, 0.999))
    at = sorted({int(s) for s in a.d_steps.split(",")})
    rows = []
    step = 0
    for target in at:
        while step < target:
            disc.train()
            opt.zero_grad(set_to_none=True)
            discriminator_loss(disc(real_b), disc(fake_b.detach())).backward()
            opt.step()
            step += 1
        disc.train()                    # as the engine: D in train mode, the fake batch alone
        disc.requires_grad_(False)
        adv_val = float(generator_adversarial_loss(disc(eval_fake)))
        adv = grad_norm(lambda x: generator_adversarial_loss(disc(x)), eval_fake)
        disc.requires_grad_(True)
        with torch.no_grad():
            disc.eval()
            p_real = float(torch.sigmoid(disc(eval_real)).mean())
            p_fake = float(torch.sigmoid(disc(eval_fake)).mean())
        row = {"d_steps": step, "adv_loss": adv_val, "adv_grad": adv, "d_real": p_real, "d_fake": p_fake,
               **{f"w_equal_{n}": rec[n] / adv for n in rec}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    record = {"archive": Path(a.archive).name, "perceptual_net": m.id, "blur_passes": a.blur, "batch": a.batch,
              "reconstruction_values": values, "reconstruction_grad": rec, "rows": rows,
              "seconds": round(time.time() - t0, 1), "torch": torch.__version__, "device": "cpu"}
    print("| D steps | D(real) | D(fake) | BCE_G | grad BCE_G | w_equal pseudo-Huber | w_equal lpips-own |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['d_steps']} | {r['d_real']:.3f} | {r['d_fake']:.3f} | {r['adv_loss']:.3f} | {r['adv_grad']:.3g} | "
              f"{r['w_equal_pseudo-huber']:.3g} | {r['w_equal_lpips-own']:.3g} |")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
