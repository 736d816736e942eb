#!/usr/bin/env python
"""Tune the CIFAR-10 mini student recipe on one GPU: one row per configuration, ready for BENCHMARKS.md.

    python bench/tune_cifar10_mini.py --out runs/tune-mini --student-seconds 175
    python bench/tune_cifar10_mini.py --out runs/tune-mini --configs base,own,own-adv0.01 --student-seconds 175
    python bench/tune_cifar10_mini.py --out runs/tune-mini --extra "own-lr6e-4:distance=lpips-own,lr=6e-4"
    python bench/tune_cifar10_mini.py --out runs/tune-mini --dry-run          # validate the grid, run nothing

What it does, through the product's stage functions (``bench/cifar10_mini.py``'s ``Bench``, so the
artifacts are shared with a mini run at the same ``--root`` and found again instead of recomputed):

1. dataset, offline extractor (the evaluation's FD / KID / precision / recall network), the ``cifar10-mini``
   EDM teacher, its pairs (20,000 train + 5,000 held-out by default) and the filter, as ``bench/cifar10_mini.py``;
2. once, when a configuration uses ``lpips-own``: the recipe's perceptual stage (its network checked against
   the extractor: another architecture, seed and weights);
3. per configuration: the recipe's student stage on that configuration's student section (sized to
   ``--student-seconds`` by timing 80 steps first, like the mini benchmark, or ``--student-steps``)
   and its evaluation stage (
   FD-<extractor id> of teacher and student on the held-out seeds vs the train split, their ratio, MSE,
   precision / recall with k = 3), then one row appended to ``OUT/tune.jsonl`` and ``OUT/tune.md``.

A configuration already in ``OUT/tune.jsonl`` (same name and same settings) is not rerun, so an interrupted
sweep continues where it stopped. The knobs of a configuration (``Config``): distance (pseudo-huber |
lpips-own), adv_weight (0 = no discriminator), ema (None: 1 - 10 / steps clipped to [0.9, 0.999], the mini
benchmark's rule), lr, batch, operator (linear = KDM | factorized = KDM-F with the unit-disk-uniform
spectral loss), channels (U-Net model_channels), blocks, pseudo_huber_c, precision, adv_start / adv_rampup (the
adversarial schedule, fractions of the steps).

End-to-end budget (issue: the mini pipeline within 10 minutes on one GPU): a row records the student's and
the evaluation's seconds and, for ``lpips-own``, the perceptual network's training seconds (a one-time stage
like the extractor); the fixed stages' times are printed once (dataset, extractor, teacher, pairs; 0 when
their artifacts were found). Goal per the issue: FD ratio <= 2.0 and MSE <= 0.012 on the held-out seeds.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

GOAL_FD_RATIO = 2.0
GOAL_MSE = 0.012


@dataclass(frozen=True)
class Config:
    name: str
    distance: str = "pseudo-huber"
    adv_weight: float = 0.0
    adv_start: float = 0.0
    adv_rampup: float = 0.0
    ema: Optional[float] = None
    lr: float = 4e-4
    batch: int = 256
    operator: str = "linear"
    channels: int = 64
    blocks: int = 1
    pseudo_huber_c: float = 0.03
    precision: str = "fp32"

    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "name"}


def _grid() -> list[Config]:
    own = dict(distance="lpips-own")
    return [
        Config("base"),                                            # today's mini student (BENCHMARKS.md: 2.38)
        Config("ph-adv0.01", adv_weight=0.01),
        Config("ph-adv0.1", adv_weight=0.1),
        Config("own", **own),
        Config("own-adv0.01", adv_weight=0.01, **own),
        Config("own-adv0.05", adv_weight=0.05, **own),
        Config("own-adv0.1", adv_weight=0.1, **own),
        Config("own-adv0.005-late", adv_weight=0.005, adv_start=0.5, adv_rampup=0.2, **own),
        Config("own-ema0.98", ema=0.98, **own),
        Config("own-ema0.995", ema=0.995, **own),
        Config("own-lr2e-4", lr=2e-4, **own),
        Config("own-lr8e-4", lr=8e-4, **own),
        Config("own-b128", batch=128, **own),
        Config("own-b512", batch=512, **own),
        Config("own-kdmf", operator="factorized", **own),
        Config("own-w32", channels=32, **own),
        Config("own-w96", channels=96, **own),
        Config("own-blocks2", blocks=2, **own),
    ]


GRID = {c.name: c for c in _grid()}
_FIELDS = {f.name: f.type for f in dataclasses.fields(Config)}


def parse_extra(text: str) -> Config:
    """'NAME:key=value,key=value' -> Config (values typed by the field: float, int, str, None)."""
    if ":" not in text:
        raise ValueError(f"--extra {text!r}: expected NAME:key=value[,key=value...]")
    name, _, body = text.partition(":")
    kw: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in body.split(","))):
        key, _, value = item.partition("=")
        if key not in _FIELDS or key == "name":
            raise ValueError(f"--extra {text!r}: unknown key {key!r}; valid: {', '.join(k for k in _FIELDS if k != 'name')}")
        kind = str(_FIELDS[key])
        if value.lower() == "none":
            kw[key] = None
        elif "float" in kind:
            kw[key] = float(value)
        elif "int" in kind:
            kw[key] = int(value)
        else:
            kw[key] = value
    return Config(name.strip(), **kw)


def model_and_train(c: Config, steps: int, seed: int, device_kind: str, perceptual_net: Optional[str]):
    """(KDMImageConfig, ImageTrainConfig) of a configuration: the budgeted cifar10-uncond of the mini benchmark."""
    from storage_schemas.kdm_image import ImageTrainConfig, KDMImageConfig, image_preset
    base = image_preset("cifar10-uncond-f" if c.operator == "factorized" else "cifar10-uncond").model_dump()
    base["unet"].update(model_channels=c.channels, num_blocks=c.blocks)
    base.update(distance=c.distance, adv_weight=c.adv_weight, adv_start=c.adv_start, adv_rampup=c.adv_rampup,
                pseudo_huber_c=c.pseudo_huber_c)
    model = KDMImageConfig.model_validate(base)
    ema = c.ema if c.ema is not None else min(0.999, max(0.9, 1 - 10 / steps))
    train = ImageTrainConfig(steps=steps, batch_size=c.batch, lr=c.lr, ema_decay=ema,
                             checkpoint_every=steps, log_every=max(steps // 50, 10), seed=seed,
                             precision=c.precision, device=device_kind, channels_last=False,
                             perceptual_net=perceptual_net if c.distance == "lpips-own" else None)
    return model, train


def _extractor_manifest(url: str):
    from pipeline.evaluation import features
    return features.read_extractor_manifest(url)


def gpu_name() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    return "cpu"


def _fmt(v: Any, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec)


def markdown_row(r: dict) -> str:
    c = r["config"]
    pr = lambda p, q: "-" if p is None else f"{p:.3f} / {q:.3f}"   # noqa: E731
    ok = r.get("fd_ratio") is not None and r["fd_ratio"] <= GOAL_FD_RATIO and (r.get("mse") or 1) <= GOAL_MSE
    return (f"| {r['date']} | {r['gpu']} | {r['name']} | {r.get('distance_name') or c['distance']} | "
            f"{c['adv_weight'] if c['adv_weight'] else 'off'} | {_fmt(r.get('ema_decay'))} | {c['lr']:g} | "
            f"{c['batch']} | {'KDM-F' if c['operator'] == 'factorized' else 'KDM'} | {c['channels']}x{c['blocks']} | "
            f"{r.get('steps', '-')} | {_fmt(r.get('student_seconds'), '.0f')} | {_fmt(r.get('fd_ratio'), '.3f')} | "
            f"{_fmt(r.get('mse'), '.4f')} | {pr(r.get('precision_teacher'), r.get('recall_teacher'))} | "
            f"{pr(r.get('precision_student'), r.get('recall_student'))} | {'yes' if ok else 'no'} |")


HEADER = ("| date | GPU | config | distance | D weight | EMA | lr | batch | operator | U-Net ch x blocks | steps | "
          "student s | FD ratio | MSE | P / R teacher | P / R student | goal |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


class Tuner:
    def __init__(self, a):
        import cifar10_mini
        self.a = a
        self.out = Path(a.out)
        self.out.mkdir(parents=True, exist_ok=True)
        mini_args = ["--out", str(self.out / "mini"), "--root", a.root or str(self.out / "artifacts"),
                     "--device", a.device, "--seed", str(a.seed), "--train-pairs", str(a.train_pairs),
                     "--heldout-pairs", str(a.heldout_pairs), "--teacher-seconds", str(a.teacher_seconds),
                     "--kid-subsets", str(a.kid_subsets), *sum((["--teacher-set", s] for s in a.teacher_set), []),
                     *(["--reference-images", str(a.reference_images)] if a.reference_images else []),
                     *(["-q"] if a.quiet else []), *a.mini_arg]
        self.bench = cifar10_mini.Bench(cifar10_mini.parse(mini_args))
        self.calibrate = cifar10_mini.calibrate
        self.results = self.out / "tune.jsonl"
        self.perceptual_url: Optional[str] = None
        self.perceptual_seconds = 0.0

    def prepare(self) -> dict:
        b = self.bench
        for name in ("dataset", "extractor", "teacher", "pairs", "filter"):
            b.run(name, getattr(b, name))
            if b.stages[name]["status"] != "ok":
                raise SystemExit(f"stage {name} failed: {b.stages[name]['status']}")
        return {n: b.stages[n].get("seconds") for n in ("dataset", "extractor", "teacher", "pairs", "filter")}

    def perceptual(self) -> str:
        if self.perceptual_url is None:
            from pipeline import stages
            from pipeline.recipes.cifar10 import PerceptualNet
            from pipeline.training.perceptual import read_perceptual_manifest
            from storage_schemas.perceptual import PerceptualNetTrainConfig, PerceptualStageConfig
            pcfg = PerceptualStageConfig(train=PerceptualNetTrainConfig(width=self.a.pnet_width,
                                                                        epochs=self.a.pnet_epochs, seed=self.a.pnet_seed),
                                         train_images=self.a.pnet_images, device=self.bench.device_kind)
            t = time.time()
            r = stages.run_stage(PerceptualNet(), self.bench.cfg.model_copy(update={"perceptual": pcfg}),
                                 self.bench.uris, stages.StageContext(progress_bars=not self.a.quiet))
            self.perceptual_seconds = time.time() - t
            m = read_perceptual_manifest(r["uri"])
            print(f"perceptual network {m.id}: test accuracy {m.test_accuracy}, trained in {m.train_seconds:.1f} s "
                  f"on {m.device} ({self.perceptual_seconds:.1f} s this call, found: {r['skipped']})", flush=True)
            self.perceptual_url = r["uri"]
        return self.perceptual_url

    def done(self) -> dict[str, dict]:
        if not self.results.exists():
            return {}
        rows = [json.loads(line) for line in self.results.read_text().splitlines() if line.strip()]
        return {r["name"]: r for r in rows if r.get("status") == "ok"}

    def steps_for(self, c: Config, pnet: Optional[str]) -> tuple[int, Optional[float]]:
        if not self.a.student_seconds:
            return self.a.student_steps, None
        from pipeline.training.image_train import train_image_student
        model, train = model_and_train(c, 10**7, self.a.seed, self.bench.device_kind, pnet)
        train = train.model_copy(update={"log_every": 20, "checkpoint_every": 10**7})
        rate = self.calibrate(lambda cb, url: train_image_student(
            self.bench.uris["filter"], model, train, str(url), device=self.a.device, progress=False, on_log=cb,
            max_steps=80), self.out / f"calibrate-{c.name}", "pairs_per_s")
        return max(100, int(self.a.student_seconds * rate / c.batch) // 100 * 100), rate

    def run_config(self, c: Config) -> dict:
        from pipeline import stages
        from pipeline.evaluation import image_metrics as im
        from pipeline.recipes.cifar10 import ImageEvaluation, ImageStudent
        from pipeline.storage import artifacts
        from pipeline.training.image_train import read_image_student_manifest
        from storage_schemas.distill_image import ImageEvalStageConfig, ImageStudentStageConfig
        uris = dict(self.bench.uris)
        row: dict[str, Any] = {"name": c.name, "config": c.settings(), "gpu": gpu_name(),
                               "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")}
        pnet = self.perceptual() if c.distance == "lpips-own" else None
        steps, rate = self.steps_for(c, pnet)
        model, train = model_and_train(c, steps, self.a.seed, self.bench.device_kind, pnet)
        # The recipe's student and evaluation stages, on this configuration's student section.
        cfg = self.bench.cfg.model_copy(update={
            "student": ImageStudentStageConfig(preset=f"cifar10-mini-tune-{c.name}", model=model, train=train),
            "evaluation": ImageEvalStageConfig(kid_subsets=self.a.kid_subsets,
                                               reference_images=self.a.reference_images)})
        ctx = stages.StageContext(progress_bars=not self.a.quiet)
        t = time.time()
        r = stages.run_stage(ImageStudent(), cfg, uris, ctx)        # train.perceptual_net is set by model_and_train
        student, skipped = r["uri"], r["skipped"]
        uris["student"] = student
        lines = artifacts.read_bytes(artifacts.join(student, "metrics.jsonl")).decode().splitlines()
        row.update(steps=steps, calibrated_pairs_per_s=rate, ema_decay=train.ema_decay,
                   student_seconds=time.time() - t, student=student, student_skipped=skipped,
                   perceptual_seconds=self.perceptual_seconds if pnet else None,
                   loss_last=json.loads(lines[-1]) if lines else None)
        sm = read_image_student_manifest(student)
        row["distance_name"] = sm.distance_name
        t = time.time()
        ev = stages.run_stage(ImageEvaluation(), cfg, uris, ctx)
        ev_out = ev["uri"]
        row.update(evaluation_seconds=time.time() - t, evaluation=ev_out, fd_ratio=ev["fd_ratio"],
                   mse=ev["mse"], fd_teacher=ev.get("fd_teacher"), fd_student=ev.get("fd_student"))
        report = im.read_report(artifacts.join(ev_out, im.REPORT))
        row.update(im.precision_recall_summary(report.metrics))
        fxm = _extractor_manifest(uris["extractor"])
        row["training_distance"] = im.training_distance_notes(sm, fxm)     # refuses the extractor's own network
        row["status"] = "ok"
        return row

    def sweep(self, configs: list[Config]) -> int:
        fixed = self.prepare()
        print(f"fixed stages (s; 0 or small when found): {fixed}", flush=True)
        done = self.done()
        failures = 0
        for c in configs:
            if c.name in done and done[c.name]["config"] == c.settings():
                print(f"{c.name}: already measured, skipped", flush=True)
                continue
            try:
                row = self.run_config(c)
            except Exception as e:  # noqa: BLE001  (a sweep reports and goes on)
                import traceback
                traceback.print_exc()
                row = {"name": c.name, "config": c.settings(), "status": f"error: {type(e).__name__}: {e}"}
                failures += 1
            with self.results.open("a") as f:
                f.write(json.dumps(row, default=str) + "\n")
            if row["status"] == "ok":
                line = markdown_row(row)
                md = self.out / "tune.md"
                if not md.exists():
                    md.write_text(HEADER + "\n")
                with md.open("a") as f:
                    f.write(line + "\n")
                print(line, flush=True)
            else:
                print(f"{c.name}: {row['status']}", flush=True)
        print(f"\nrows in {self.out / 'tune.md'} (all fields in {self.results})")
        return 1 if failures else 0


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--root", default=None, help="artifact root (default OUT/artifacts; share it with a mini run)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--configs", default=",".join(GRID), help=f"comma-separated subset of: {', '.join(GRID)}")
    p.add_argument("--extra", action="append", default=[], metavar="NAME:key=value,...",
                   help=f"an ad hoc configuration; keys: {', '.join(k for k in _FIELDS if k != 'name')}")
    p.add_argument("--student-seconds", type=float, default=175, help="size each student to this (0: --student-steps)")
    p.add_argument("--student-steps", type=int, default=1000)
    p.add_argument("--teacher-seconds", type=float, default=0,
                   help="size the teacher by timing (its step count, hence its artifact, then varies between runs); "
                        "default 0: the fixed --teacher-set steps")
    p.add_argument("--teacher-set", action="append", default=None, metavar="KEY=VALUE",
                   help="cifar10-mini teacher preset override (default: steps=2700, the BENCHMARKS.md mini teacher)")
    p.add_argument("--train-pairs", type=int, default=20_000)
    p.add_argument("--heldout-pairs", type=int, default=5_000)
    p.add_argument("--reference-images", type=int, default=None)
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--pnet-width", type=int, default=32)
    p.add_argument("--pnet-epochs", type=int, default=16)
    p.add_argument("--pnet-seed", type=int, default=1, help="must differ from the extractor's seed (--seed)")
    p.add_argument("--pnet-images", type=int, default=None, help="train it on N train images (default: all)")
    p.add_argument("--mini-arg", action="append", default=[], metavar="ARG",
                   help="passed on to bench/cifar10_mini.py's options (e.g. --mini-arg=--extractor-epochs=1)")
    p.add_argument("--dry-run", action="store_true", help="validate every configuration and print them")
    p.add_argument("-q", "--quiet", action="store_true")
    a = p.parse_args(argv)
    if a.teacher_set is None:
        a.teacher_set = ["steps=2700"]
    names = [s.strip() for s in a.configs.split(",") if s.strip()]
    unknown = [n for n in names if n not in GRID]
    if unknown:
        p.error(f"unknown configurations {unknown}; valid: {', '.join(GRID)}")
    try:
        a.config_list = [GRID[n] for n in names] + [parse_extra(e) for e in a.extra]
    except ValueError as e:
        p.error(str(e))
    return a


def main(argv=None) -> int:
    a = parse(argv)
    if a.dry_run:
        for c in a.config_list:
            model, train = model_and_train(c, a.student_steps, a.seed, "cpu", "PERCEPTUAL_NET_URI")
            print(f"{c.name}: distance={model.distance} adv_weight={model.adv_weight} operator={model.operator} "
                  f"unet={model.unet.model_channels}x{model.unet.num_blocks} lr={train.lr} batch={train.batch_size} "
                  f"ema={train.ema_decay:.4g} precision={train.precision}")
        return 0
    return Tuner(a).sweep(a.config_list)


if __name__ == "__main__":
    sys.exit(main())
