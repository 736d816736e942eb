#!/usr/bin/env python
"""CIFAR-10 mini benchmark on one GPU in <= 10 minutes: data -> teacher -> pairs -> filter -> KDM student -> evaluation.

    python bench/cifar10_mini.py --out runs/bench-cifar10-mini --teacher-seconds 200 --student-seconds 150
    python bench/cifar10_mini.py --out runs/x --stages dataset,extractor      # the offline metric alone

Stages: the product's stages of the ``cifar10`` recipe (pipeline/recipes/cifar10.py, run one by one through
``pipeline.stages.run_stage`` on one ``storage_schemas.distill_image.DistillImageConfig`` built from the
arguments on preset mini: dataset, extractor, teacher = EDM bootstrap of preset cifar10-mini, pairs = EDM
Heun, 35 NFE, train + held-out seeds, filter = the image privacy filter and dedup (recipe defaults: Carlini
et al.'s ratio rule, shifts and flips; its calibration on as many test images as train pairs, at most
10,000), student = a budgeted cifar10-uncond KDM trained on the filtered pairs, evaluation = FD-<extractor
id> and KID of teacher and student vs the train split, their ratio, student-vs-teacher MSE on held-out
seeds, grids), with what a benchmark adds around them: time budgets, the extractor's validation, preview
grids during the student's run, the local-structure figure. ``--teacher-seconds`` / ``--student-seconds``
time a short run of the same config first and then fix the number of steps in the config to fit the budget
(the steps are recorded; the result is an ordinary content-addressed artifact, found again by a rerun).

Results: a markdown table on stdout, and under ``--out``: ``results.json`` (every stage, its time, its
numbers, the filter's counts per reason, the student's loss curve from its run's metrics.jsonl, the run's
config), ``metrics.json`` (storage_schemas.protocol.ImageMetricReport) and PNGs (teacher samples, the
filter's closest generated | training matches, student samples at four points of its run, teacher |
student, local structure).

Extractor validation (the offline metric's own sanity check): test accuracy of the ResNet-9 classifier
(target >= 90 %), FD-<id> of the CIFAR-10 test split against the train split (two samples of the same
distribution: small) and of uniform-noise images against the train split (large), with KID beside
them. ``--determinism-check`` retrains the network with the same seed and compares the weights' sha256.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BUDGET_S = 600
STUDENT_PRESET = "cifar10-mini"       # the name the student's manifest records


class StageUnavailable(RuntimeError):
    """A stage cannot run: an input stage did not run (not requested, or it failed)."""


def build_config(a):
    """The run's one DistillImageConfig (preset mini, every stage's section from the arguments). The
    student's EMA and the steps decided by ``--teacher-seconds`` / ``--student-seconds`` are set later by
    their stages, before they run."""
    from pipeline import presets
    from pipeline.teachers.bootstrap import load_edm_teacher_config
    from storage_schemas import SamplerSettings, SeedRange
    from storage_schemas.distill_image import (DistillImageConfig, ExtractorStageConfig, ImageDatasetStageConfig,
                                               ImageEvalStageConfig, ImagePairsStageConfig, ImageStudentStageConfig)
    from storage_schemas.filter_images import ImageFilterConfig
    from storage_schemas.kdm_image import ImageTrainConfig, KDMImageConfig, image_preset
    from storage_schemas.protocol import ExtractorTrainConfig
    device = device_kind(a.device)
    extractor = ExtractorStageConfig(
        train=ExtractorTrainConfig(epochs=a.extractor_epochs, seed=a.seed,
                                   **({"width": a.extractor_width} if a.extractor_width else {})),
        train_images=a.extractor_images, device=device)
    teacher = load_edm_teacher_config("cifar10-mini", sets=[f"device={device}", f"seed={a.seed}", *a.teacher_set])
    n, h = a.train_pairs, a.heldout_pairs
    pairs = ImagePairsStageConfig(seeds=SeedRange(start=0, stop=n), heldout_seeds=SeedRange(start=n, stop=n + h),
                                  sampler=SamplerSettings(kind="edm-heun", method="heun", steps=a.teacher_steps,
                                                          noise_scale=80.0),
                                  chunk_size=min(10_000, n))
    # The filter at the recipe's settings, its calibration (test -> train nearest distances, for the report
    # and the absolute rule) on as many test images as there are train pairs, its grid at most 64 matches.
    filt = presets.validate_with_sets(
        ImageFilterConfig, {"device": device, "calibration_samples": min(a.train_pairs, 10_000),
                            "grid_size": min(64, a.train_pairs), "chunk_size": min(4096, a.train_pairs)},
        "the bench's image filter", a.filter_set)
    # Budgeted cifar10-uncond: narrower/shallower U-Nets, pseudo-Huber distance (LPIPS needs VGG16
    # weights that offline machines lack), no discriminator; EMA tuned for a short run (the student stage).
    base = image_preset("cifar10-uncond").model_dump()
    base["unet"].update(model_channels=a.student_channels, num_blocks=a.student_blocks)
    base.update(distance="pseudo-huber", adv_weight=0.0)
    train = ImageTrainConfig(steps=a.student_steps, batch_size=a.student_batch, lr=a.student_lr,
                             checkpoint_every=a.student_steps, log_every=100, seed=a.seed,
                             precision=a.student_precision, device=device)
    if a.student_layout != "auto":
        train = train.model_copy(update={"channels_last": a.student_layout == "nhwc"})
    student = ImageStudentStageConfig(preset=STUDENT_PRESET, model=KDMImageConfig.model_validate(base), train=train)
    # Model instances replace the preset's sections whole (a mapping would merge into them).
    return DistillImageConfig.model_validate({
        "preset": "mini", "root": a.root, "device": device,
        "dataset": ImageDatasetStageConfig(archive=a.archive or _cifar10_archive()), "extractor": extractor, "teacher": teacher,
        "pairs": pairs, "filter": filt, "student": student,
        "evaluation": ImageEvalStageConfig(kid_subsets=a.kid_subsets, reference_images=a.reference_images)})


def device_kind(device: str) -> str:
    return "cuda" if str(device).startswith("cuda") else "cpu"


class Bench:
    def __init__(self, args):
        from pipeline.stages import StageContext
        self.a = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.root = str(Path(args.root) if args.root else self.out / "artifacts")
        args.root = self.root
        if str(args.device).startswith("cuda:"):
            import torch      # the stages run on "cuda", the current device: make it the one asked for
            torch.cuda.set_device(torch.device(args.device))
        self.cfg = build_config(args)
        self.sctx = StageContext(progress_bars=not args.quiet)
        self.uris: dict[str, str] = {}          # stage name -> output URI of the stages that ran
        self.stages: dict[str, dict[str, Any]] = {}
        self.metrics: list = []
        self.ctx: dict[str, Any] = {}
        self.t0 = time.time()

    def run(self, name: str, fn: Callable[[], dict]) -> None:
        if name not in self.a.stages:
            self.stages[name] = {"status": "not requested"}
            return
        t = time.time()
        try:
            info = fn() or {}
            self.stages[name] = {"status": "ok", "seconds": round(time.time() - t, 1), **info}
        except StageUnavailable as e:
            self.stages[name] = {"status": str(e), "seconds": round(time.time() - t, 1)}
        except Exception as e:  # noqa: BLE001  (a benchmark reports and goes on)
            self.stages[name] = {"status": f"error: {type(e).__name__}: {e}", "seconds": round(time.time() - t, 1)}
            traceback.print_exc()
        print(f"[{time.time() - self.t0:7.1f}s] {name}: {self.stages[name]['status']}", flush=True)

    def requires(self, *names: str) -> None:
        missing = [k for k in names if k not in self.uris]
        if missing:
            raise StageUnavailable(f"skipped: needs the output of {', '.join(missing)}")

    def stage(self, stage) -> dict:
        """One product stage through the skeleton on the run's config and the URIs of the earlier stages."""
        from pipeline import stages
        self.requires(*stage.inputs)
        r = stages.run_stage(stage, self.cfg, self.uris, self.sctx)
        self.uris[stage.name] = r["uri"]
        return r

    def update(self, section: str, **fields) -> None:
        """Change fields of one section of the run's config (e.g. the steps a calibration decided)."""
        part = getattr(self.cfg, section)
        self.cfg = self.cfg.model_copy(update={section: part.model_copy(update=fields)})

    @property
    def device_kind(self) -> str:
        return device_kind(self.a.device)

    # ------------------------------------------------------------------------- 1. dataset
    def dataset(self) -> dict:
        from pipeline.data.datasets import open_image_dataset
        from pipeline.recipes.cifar10 import Dataset
        r = self.stage(Dataset())
        ds = open_image_dataset(r["uri"])
        self.ctx.update(dataset_id=ds.version, train=ds.load("train"), test=ds.load("test"))
        return {"version": ds.version, "skipped": r["skipped"], "train": len(self.ctx["train"][0]),
                "test": len(self.ctx["test"][0]), "classes": r["classes"]}

    # ------------------------------------------------------------------------- 2. offline extractor
    def extractor(self) -> dict:
        """The extractor stage, then the offline metric's own validation (test vs train, noise vs train)."""
        self.requires("dataset")
        import torch
        from pipeline.evaluation import features
        from pipeline.evaluation import image_metrics as im
        from pipeline.evaluation.evaluate_image import evenly_spaced
        from pipeline.recipes.cifar10 import Extractor
        (x, y), (xt, _) = self.ctx["train"], self.ctx["test"]
        t = time.time()
        r = self.stage(Extractor())
        train_s = time.time() - t
        m = features.read_extractor_manifest(r["uri"])
        fx = features.load_extractor(r["uri"], self.a.device)
        x_ref = x[evenly_spaced(len(x), self.a.reference_images)]      # the evaluation stage's reference set
        ref = im.reference_stats(x_ref, dataset_id=self.ctx["dataset_id"], split="train", extractor=fx, root=self.root)
        n = len(xt)
        noise = np.random.default_rng(self.a.seed).integers(0, 256, xt.shape, dtype=np.uint8)
        kid = dict(kid_subsets=self.a.kid_subsets, kid_subset_size=min(1000, n, len(x_ref)))
        test_ms = im.distribution_metrics(xt, fx, ref, subject="cifar10-test", model_version=self.ctx["dataset_id"],
                                          **kid)
        noise_ms = im.distribution_metrics(noise, fx, ref, subject=f"uniform-noise(seed={self.a.seed})", **kid)
        self.metrics += test_ms + noise_ms
        info = {"id": m.id, "weights_sha256": m.weights_sha256, "test_accuracy": m.test_accuracy,
                "train_seconds": round(m.train_seconds, 1), "stage_train_seconds": round(train_s, 1),
                "skipped": r["skipped"], "device": m.device, "fd_test_vs_train": test_ms[0].value,
                "fd_noise_vs_train": noise_ms[0].value, "kid_test_vs_train": test_ms[1].value,
                "kid_noise_vs_train": noise_ms[1].value, "reference": ref.manifest.id, "n": n}
        if m.test_accuracy is not None and m.test_accuracy < 0.90:
            info["warning"] = f"test accuracy {m.test_accuracy:.4f} is below the 0.90 target"
        if self.a.determinism_check:
            net, _ = features.train_network(x, y, self.cfg.extractor.train, device=self.a.device, progress=False)
            sha = features.weights_sha256(net)
            info["determinism_check"] = "identical weights" if sha == m.weights_sha256 else \
                f"DIFFERENT weights: {sha[:16]} vs {m.weights_sha256[:16]}"
            del net
        if self.a.inception:
            try:
                inc = im.load_inception(device=self.a.device)
                iref = im.reference_stats(x_ref, dataset_id=self.ctx["dataset_id"], split="train", extractor=inc,
                                          root=self.root)
                self.metrics += im.distribution_metrics(xt, inc, iref, subject="cifar10-test", with_is=True, **kid)
            except im.MetricUnavailable as e:
                info["inception"] = str(e)
        if self.device_kind == "cuda":
            torch.cuda.empty_cache()
        return info

    # ------------------------------------------------------------------------- 3. teacher
    def teacher(self) -> dict:
        self.requires("dataset")
        from pipeline.recipes.cifar10 import EDMTeacher
        from pipeline.teachers.bootstrap import PREVIEW, train_edm_teacher
        cfg = self.cfg.teacher
        info: dict[str, Any] = {}
        if self.a.teacher_seconds:
            # Size the run to the time budget: time a short run of the same config, then fix `steps`.
            rate = calibrate(lambda cb, url: train_edm_teacher(
                self.uris["dataset"], cfg.model_copy(update={"steps": 10**7, "log_every": 20}), url,
                progress=False, on_log=cb, stop_after=100), self.out / "calibrate-teacher", "images_per_s")
            steps = max(100, int(self.a.teacher_seconds * rate / cfg.batch_size) // 100 * 100)
            self.update("teacher", steps=steps, checkpoint_every=steps)
            cfg = self.cfg.teacher
            info["calibrated_images_per_s"] = round(rate, 1)
        t = time.time()
        r = self.stage(EDMTeacher())
        train_s = time.time() - t
        copy_if_exists(Path(r["uri"]) / PREVIEW, self.out / "teacher_samples.png")
        return {**info, "id": r["version"], "skipped": r["skipped"], "steps": cfg.steps, "batch_size": cfg.batch_size,
                "images": cfg.steps * cfg.batch_size, "train_seconds": round(train_s, 1), "final_loss": r["final_loss"]}

    # ------------------------------------------------------------------------- 4. pairs
    def pairs(self) -> dict:
        from pipeline.recipes.common import PairsStage
        t = time.time()
        r = self.stage(PairsStage())
        secs = time.time() - t
        n = len(self.cfg.pairs.seeds) + len(self.cfg.pairs.heldout_seeds)
        return {"version": r["version"], "skipped": r["skipped"], "train": r["count"], "heldout": r["heldout_count"],
                "pairs_per_s": round(n / secs, 1), "nfe": r["nfe"]}

    # ------------------------------------------------------------------------- 5. filter
    def filter(self) -> dict:
        """The image filter (privacy filter and dedup) between the pairs and the student: its counts per
        reason, its calibration and the grid of the closest generated -> training matches."""
        from pipeline.pairs.filter_images import GRID_FILE, read_filter_report
        from pipeline.recipes.cifar10 import ImageFilter
        r = self.stage(ImageFilter())
        report = read_filter_report(r["uri"])
        cal = report.get("calibration") or {}
        copy_if_exists(Path(r["uri"]) / GRID_FILE, self.out / "filter_grid.png")
        return {"version": r["version"], "skipped": r["skipped"], "source_version": r["source_version"],
                "train": r["count"], "heldout": r["heldout_count"], "counts": r["counts"],
                "dropped": sum(v for k, v in r["counts"].items() if k != "kept"),
                "rule": self.cfg.filter.rule, "thresholds": report.get("thresholds"),
                "calibration_test_images": cal.get("test_images"), "calibration_flag_rate": cal.get("test_flag_rate"),
                "filter_seconds": report.get("seconds"), "pairs_per_s": report.get("pairs_per_second"),
                "device": report.get("device")}

    # ------------------------------------------------------------------------- 6. student
    def student(self) -> dict:
        self.requires("filter")
        from pipeline.evaluation.image_metrics import save_grid
        from pipeline.evaluation.sample import generate_images
        from pipeline.recipes.cifar10 import ImageStudent
        from pipeline.storage.pairstore import PairStore
        from pipeline.training.image_train import train_image_student
        pairs_url = self.uris["filter"]          # the student trains on the filtered pairs
        model_cfg, train_cfg = self.cfg.student.model, self.cfg.student.train
        info: dict[str, Any] = {}
        if self.a.student_seconds:
            # Time both memory layouts (GroupNorm has no channels_last kernel: NHWC costs copies around every
            # norm, NCHW costs slower convolutions) and keep the faster one.
            layouts = {"nhwc": True, "nchw": False} if self.a.student_layout == "auto" else \
                {self.a.student_layout: self.a.student_layout == "nhwc"}
            rates = {}
            for name, cl in layouts.items():
                cfg = train_cfg.model_copy(update={"steps": 10**7, "log_every": 20, "channels_last": cl})
                rates[name] = calibrate(lambda cb, url: train_image_student(
                    pairs_url, model_cfg, cfg, str(url), device=self.a.device, progress=False,
                    on_log=cb, max_steps=80), self.out / f"calibrate-student-{name}", "pairs_per_s")
            best = max(rates, key=rates.get)
            rate = rates[best]
            steps = max(100, int(self.a.student_seconds * rate / train_cfg.batch_size) // 100 * 100)
            train_cfg = train_cfg.model_copy(update={"steps": steps, "log_every": max(steps // 50, 10),
                                                     "channels_last": layouts[best]})
            info["calibrated_pairs_per_s"] = {k: round(v, 1) for k, v in rates.items()}
        # EMA averaging over about a tenth of the run (a fixed 0.9999 would keep a short run at its initial
        # weights); sample grids of the EMA model on fixed held-out noise at four points of the run.
        ema = self.a.student_ema or min(0.999, max(0.9, 1 - 10 / train_cfg.steps))
        train_cfg = train_cfg.model_copy(update={"checkpoint_every": max(train_cfg.steps // 4, 1), "ema_decay": ema})
        self.update("student", train=train_cfg)
        held = PairStore.open(pairs_url).heldout()
        fixed = held.load(("x_T",))["x_T"][:64] if held is not None else None
        previews: list[str] = []

        def preview(step: int, ema) -> None:
            if fixed is not None:
                name = f"student_step{step:06d}.png"
                save_grid(generate_images(ema, fixed), self.out / name, nrow=8)
                previews.append(name)

        t = time.time()
        r = self.stage(ImageStudent(on_checkpoint=preview))
        curve = [{k: round(v, 5) if isinstance(v, float) else v for k, v in rec.items()
                  if k in ("step", "loss_total", "loss_rec", "loss_lat", "loss_pred", "pairs_per_s")}
                 for rec in student_metrics(r["uri"])]
        return {**info, "version": r["version"], "skipped": r["skipped"], "steps": train_cfg.steps,
                "batch_size": train_cfg.batch_size, "precision": train_cfg.precision,
                "channels_last": train_cfg.channels_last, "ema_decay": ema, "lr": train_cfg.lr,
                "train_seconds": round(time.time() - t, 1), "nonfinite_steps": r["nonfinite_steps"],
                "resumed_from_step": r["resumed_from_step"], "loss_first": curve[0] if curve else None,
                "loss_last": curve[-1] if curve else None, "loss_curve": curve, "previews": previews}

    # ------------------------------------------------------------------------- 7. evaluation
    def evaluation(self) -> dict:
        """The evaluation stage (FD/KID of teacher and student, MSE, LPIPS when possible, grids), then the
        local-structure figure (paper Sec. 6.1)."""
        self.requires("dataset", "extractor", "filter", "student", "teacher")
        import torch
        from models.samplers import edm_heun
        from pipeline.evaluation import image_metrics as im
        from pipeline.evaluation.sample import load_image_student
        from pipeline.recipes.cifar10 import ImageEvaluation
        from pipeline.storage.pairstore import PairStore
        from pipeline.teachers.flow_matching import load_denoiser
        r = self.stage(ImageEvaluation())
        self.metrics += list(im.read_report(r["report"]).metrics)
        for f in r["plots"].values():
            copy_if_exists(Path(r["uri"]) / f, self.out / f)
        info = {"evaluation": r["uri"], "skipped": r["skipped"], "fd_ratio_student_over_teacher": r["fd_ratio"],
                "kid_teacher": r["kid_teacher"], "kid_student": r["kid_student"], "mse": r["mse"],
                "plots": dict(r["plots"]), "dataset_source": r["notes"].get("dataset_source", "not recorded"),
                **({"lpips": r["notes"]["lpips"]} if "lpips" in r["notes"] else {})}
        # Local structure: the teacher as a denoiser under EDM's Heun sampler, the student in one step.
        student, _ = load_image_student(self.uris["student"], self.a.device)
        den, _ = load_denoiser(self.uris["teacher"], self.a.device)
        dev = torch.device(self.a.device)
        x_T = torch.from_numpy(PairStore.open(self.uris["filter"]).heldout().load(("x_T",))["x_T"][0] / 80.0)
        res = im.local_structure(lambda z: student.generate(z.to(dev)),
                                 lambda z: edm_heun(den, z.to(dev), num_steps=self.a.teacher_steps),
                                 x_T, seed=self.a.seed, per_sigma=8, noise_scale=80.0,
                                 path=self.out / "local_structure.png")
        info["plots"]["local_structure"] = Path(res["path"]).name
        return info

    # ------------------------------------------------------------------------- output
    def finish(self) -> int:
        from pipeline.evaluation import image_metrics as im
        total = time.time() - self.t0
        report = im.make_report(self.metrics, notes={"stages": self.stages, "total_seconds": round(total, 1)})
        im.write_report(report, str(self.out))
        results = {"stages": self.stages, "total_seconds": round(total, 1), "budget_seconds": BUDGET_S,
                   "metrics": [m.model_dump(mode="json") for m in self.metrics], "args": vars(self.a),
                   "config": self.cfg.model_dump(mode="json"), "uris": self.uris}
        (self.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        print("\n## cifar10-mini\n\n| stage | status | seconds |\n|---|---|---|")
        for name, s in self.stages.items():
            print(f"| {name} | {s['status']} | {s.get('seconds', '')} |")
        print(f"| total | {'within' if total <= BUDGET_S else 'OVER'} the {BUDGET_S} s budget | {total:.1f} |")
        ex = self.stages.get("extractor", {})
        if ex.get("status") == "ok":
            print(f"\nextractor {ex['id']}: test accuracy {ex['test_accuracy']:.4f}, trained in {ex['train_seconds']} s "
                  f"on {ex['device']}" + (f", determinism: {ex['determinism_check']}" if "determinism_check" in ex else ""))
        fi = self.stages.get("filter", {})
        if fi.get("status") == "ok":
            print(f"\nfilter ({fi['rule']}): " + ", ".join(f"{k} {v}" for k, v in fi["counts"].items()))
        ev = self.stages.get("evaluation", {})
        if ev.get("status") == "ok":
            print(f"\nFD ratio student / teacher: {ev['fd_ratio_student_over_teacher']:.3f} (dataset: "
                  f"{ev.get('dataset_source', 'not recorded')})")
        if self.metrics:
            print("\n" + im.metrics_markdown(self.metrics))
        print(f"\nwrote {self.out / 'results.json'} and {self.out / im.REPORT}")
        requested = [s for n, s in self.stages.items() if n in self.a.stages]
        return 0 if all(s["status"] == "ok" for s in requested) else 1


# ----------------------------------------------------------------------------- helpers

def calibrate(run: Callable, scratch: Path, key: str) -> float:
    """Throughput of a short run: ``run(on_log, url)`` logs records with ``key``; the median of those after
    the first (which carries the warm-up) is returned. The scratch run is deleted afterwards."""
    import shutil
    recs: list[dict] = []

    def clean() -> None:
        for p in scratch.parent.glob(scratch.name + "*"):      # the run and its .partial work directory
            shutil.rmtree(p)
    clean()
    try:
        run(recs.append, str(scratch))
    finally:
        clean()
    rates = sorted(r[key] for r in recs[1:]) or [r[key] for r in recs]
    if not rates:
        raise RuntimeError(f"calibration run logged no {key}")
    return float(rates[len(rates) // 2])


def copy_if_exists(src: Path, dst: Path) -> None:
    import shutil
    if src.exists():
        shutil.copyfile(src, dst)


def student_metrics(uri: str) -> list[dict]:
    """The logged records of the student's run (its ``metrics.jsonl``: interval means of the losses,
    pairs/s), also for a run found committed; a line torn by a kill mid-write is skipped."""
    from pipeline.storage import artifacts, checkpoints
    return checkpoints.read_metrics(artifacts.join(uri, checkpoints.METRICS_FILE))


STAGES = ("dataset", "extractor", "teacher", "pairs", "filter", "student", "evaluation")


def _cifar10_archive() -> str:
    from pipeline.data import sources
    return sources.resolve("cifar10").archive


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archive", default=None, help="a CIFAR-10 archive (default: cifar10 from $KDM_DATA_DIR, "
                   "downloaded there when absent; pipeline/data/sources.py)")
    p.add_argument("--out", required=True, help="results directory (results.json, metrics.json, PNGs)")
    p.add_argument("--root", default=None, help="artifact root (default OUT/artifacts)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--extractor-epochs", type=int, default=24)
    p.add_argument("--extractor-width", type=int, default=None, help="ResNet-9 base width (default: the recipe's 64)")
    p.add_argument("--extractor-images", type=int, default=None, help="train the extractor on N train images (all)")
    p.add_argument("--reference-images", type=int, default=None,
                   help="reference statistics from N train images (all; the evaluation spaces them evenly)")
    p.add_argument("--determinism-check", action="store_true", help="retrain the extractor and compare weights")
    p.add_argument("--inception", action="store_true", help="also FID/KID/IS of the test split when the weights exist")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--teacher-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the cifar10-mini teacher preset (e.g. steps=4000)")
    p.add_argument("--train-pairs", type=int, default=20_000)
    p.add_argument("--heldout-pairs", type=int, default=5_000)
    p.add_argument("--teacher-steps", type=int, default=18, help="EDM Heun steps (35 NFE at 18)")
    p.add_argument("--filter-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the image filter's config (storage_schemas.filter_images."
                        "ImageFilterConfig, e.g. rule=gu); default: the recipe's settings, calibration on as many "
                        "test images as train pairs (at most 10,000)")
    p.add_argument("--student-steps", type=int, default=4000)
    p.add_argument("--student-batch", type=int, default=256,
                   help="the budgeted U-Nets are bound by kernel launches, so a larger batch costs little")
    p.add_argument("--student-lr", type=float, default=4e-4)
    p.add_argument("--student-layout", choices=("auto", "nhwc", "nchw"), default="auto",
                   help="memory layout of the student's U-Nets (auto: time both, keep the faster)")
    p.add_argument("--student-ema", type=float, default=None, help="EMA decay (default: 1 - 10 / steps in [0.9, 0.999])")
    p.add_argument("--student-channels", type=int, default=64)
    p.add_argument("--student-blocks", type=int, default=1)
    p.add_argument("--student-precision", choices=("fp32", "bf16"), default="fp32",
                   help="fp32 (+TF32) is faster than bf16 autocast for the small budgeted U-Nets")
    p.add_argument("--teacher-seconds", type=float, default=0,
                   help="size the teacher run to about this many seconds (times 100 steps first); 0 = preset steps")
    p.add_argument("--student-seconds", type=float, default=0,
                   help="size the student run to about this many seconds (times 120 steps first); 0 = --student-steps")
    p.add_argument("-q", "--quiet", action="store_true")
    a = p.parse_args(argv)
    a.stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    unknown = set(a.stages) - set(STAGES)
    if unknown:
        p.error(f"unknown stages {sorted(unknown)}; valid: {', '.join(STAGES)}")
    return a


def main(argv=None) -> int:
    from pipeline.errors import KDMError
    a = parse(argv)
    try:
        b = Bench(a)
    except (KDMError, ValueError) as e:     # the arguments make no valid config (pydantic errors are ValueErrors)
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name in STAGES:
        b.run(name, getattr(b, name))
    return b.finish()


if __name__ == "__main__":
    sys.exit(main())
