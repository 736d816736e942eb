"""The ``cifar10`` recipe: dataset -> extractor -> teacher -> pairs -> filter -> student -> evaluation -> report.

What is particular to images lives here: the dataset archive, the offline feature extractor of FD/KID,
the EDM teacher (bootstrapped on the dataset, or an existing artifact given as ``teacher_uri`` and verified
by its sha256), the image filter, the image KDM engine and the image metrics. The GPU stages (teacher,
pairs, filter on cuda, student, evaluation; the extractor on cuda) take ``cfg.device``; a stage whose
output exists needs no GPU. ``gpus`` > 1 runs the pairs and the student stage under torchrun.
"""
from __future__ import annotations


from pipeline.errors import KDMError
from pipeline.recipes.common import PairsStage, PairStoreStage
from pipeline.stages import GPU_POOL, DevicePooled, Stage, StageContext
from pipeline.storage import artifacts
from storage_schemas import recipe_version, stable_hash


def _dataset_hash(uri: str) -> str:
    from pipeline.data.datasets import open_image_dataset
    return open_image_dataset(uri).manifest.content_hash


class DatasetMissing(KDMError):
    """The named dataset is neither given, nor in the data directory (the plan: it is downloaded by the run)."""

    plan_after = "dataset download"


def dataset_archive(cfg) -> str:
    """The archive of the run's dataset: ``dataset.archive``, else the data directory's known file (found,
    never downloaded here: the flow and ``kdm distill`` resolve, and download, before any stage)."""
    if cfg.dataset.archive:
        return cfg.dataset.archive
    from pipeline.data import sources
    try:
        return sources.resolve(cfg.dataset.name, download_missing=False).archive
    except KDMError as e:
        raise DatasetMissing(str(e)) from None


class Dataset(Stage):
    """The dataset (by name: ``pipeline.data.sources``; or an explicit archive) prepared into a versioned
    Zarr group, ``<root>/datasets/<version>``."""

    name, kind, inputs = "dataset", "datasets", ()

    def output(self, cfg, uris):
        from pipeline.data.datasets import dataset_version
        archive = dataset_archive(cfg)
        from pipeline.data.sources import file_digests
        try:
            sha = file_digests(archive, ("sha256",))["sha256"]
        except FileNotFoundError:
            raise KDMError(f"dataset archive {archive} does not exist; set dataset.archive to a CIFAR-10 archive "
                           f"(the python release cifar-10-python.tar.gz or an ImageFolder tar.gz "
                           f"train|test/<class>/<file>), or leave it unset to use {cfg.dataset.name} from "
                           f"$KDM_DATA_DIR") from None
        return artifacts.join(cfg.root, "datasets", dataset_version(sha, cfg.dataset.chunk_size))

    def done(self, out):
        return artifacts.exists(out)

    def run(self, cfg, uris, out, ctx):
        from pipeline.data.datasets import prepare_image_dataset
        prepare_image_dataset(dataset_archive(cfg), out, chunk_size=cfg.dataset.chunk_size,
                              progress=ctx.progress_bars)
        return {}

    def summary(self, cfg, uris, out):
        from pipeline.data.datasets import open_image_dataset, source_text
        m = open_image_dataset(out).manifest
        return {"uri": out, "version": m.version, "content_hash": m.content_hash, "classes": len(m.class_names),
                "image_shape": list(m.image_shape), "source": source_text(m),
                **{f"{s}_images": info.count for s, info in m.splits.items()}}

    def lineage(self, s):
        return (f"dataset `{s['version']}` ({s.get('train_images', 0)} train images, content "
                f"`{s['content_hash'][:16]}`; source: {s.get('source', 'not recorded')})")


class Extractor(DevicePooled):
    """The offline feature extractor of FD-<id> / KID-<id>, trained on the train split (not FID)."""

    name, kind, inputs = "extractor", "extractors", ("dataset",)

    def output(self, cfg, uris):
        c = cfg.extractor
        v = "fx-" + stable_hash(recipe_version(), "extractor", _dataset_hash(uris["dataset"]), c.train, c.train_images)
        return artifacts.join(cfg.root, "extractors", v)

    def device(self, cfg):
        return cfg.extractor.device

    def run(self, cfg, uris, out, ctx):
        from pipeline.data.datasets import open_image_dataset
        from pipeline.evaluation import features
        from pipeline.evaluation.evaluate_image import evenly_spaced
        c = cfg.extractor
        ds = open_image_dataset(uris["dataset"])
        x, y = ds.load("train")
        idx = evenly_spaced(len(x), c.train_images)
        xt, yt = ds.load("test") if "test" in ds.manifest.splits else (None, None)
        features.train_extractor(x[idx], y[idx], c.train, out, test_images=xt, test_labels=yt, dataset_id=ds.version,
                                 device=c.device, progress=ctx.progress_bars)
        return {}

    def summary(self, cfg, uris, out):
        from pipeline.evaluation import features
        m = features.read_extractor_manifest(out)
        return {"uri": out, "version": self.version(out), "id": m.id, "sha256": m.weights_sha256,
                "test_accuracy": m.test_accuracy, "feature_dim": m.feature_dim, "train_images": m.train_images,
                "trained_on": m.device}

    def lineage(self, s):
        return f"extractor `{s['id']}` (test accuracy {s['test_accuracy']}, sha256 `{s['sha256'][:16]}`)"


def check_teacher(uri: str, conditional: bool):
    """The manifest of the EDM teacher at ``uri``, of the run's conditioning; a KDMError says what is wrong."""
    from pipeline.storage.manifests import read_teacher_manifest
    try:
        m = read_teacher_manifest(uri)
    except KDMError as e:
        raise KDMError(f"teacher {uri} is not a readable teacher artifact: {e}") from None
    if m.kind != "edm":
        raise KDMError(f"teacher {uri} is a {m.kind} teacher; image distillation needs an EDM teacher "
                       f"(kdm teacher bootstrap / kdm teacher import-edm)")
    if bool(m.model.label_dim) != conditional:
        raise KDMError(f"teacher {uri} is {'class-conditional' if m.model.label_dim else 'unconditional'} "
                       f"(label_dim {m.model.label_dim}) but the run has conditional={conditional}: set "
                       f"conditional={not conditional} (deployment kdm/distill-cifar10{'-cond' if not conditional else ''})")
    return m


class EDMTeacher(Stage):
    """An EDM-preconditioned SongUNet bootstrapped on the dataset (resumable), or the given ``teacher_uri``
    (verified: an EDM teacher of the run's conditioning whose weights match their sha256)."""

    name, kind, inputs = "teacher", "teachers", ("dataset",)
    progress_label = "EDM teacher bootstrap"

    def check(self, cfg):
        if cfg.teacher_uri:
            m = check_teacher(cfg.teacher_uri, cfg.conditional)
            artifacts.read_verified(artifacts.join(cfg.teacher_uri, m.weights_file), m.weights_sha256, "teacher")

    def output(self, cfg, uris):
        if cfg.teacher_uri:
            return cfg.teacher_uri
        from pipeline.teachers.bootstrap import bootstrap_version
        return artifacts.join(cfg.root, "teachers", bootstrap_version(_dataset_hash(uris["dataset"]), cfg.teacher))

    def pool(self, cfg):
        return None if cfg.teacher_uri else GPU_POOL

    def device(self, cfg):
        return cfg.device

    def run(self, cfg, uris, out, ctx: StageContext):
        if cfg.teacher_uri:
            raise KDMError(f"teacher {cfg.teacher_uri} is not a committed teacher artifact (no manifest)")
        from pipeline.teachers.bootstrap import train_edm_teacher
        steps = cfg.teacher.steps
        resumed: list[int] = []

        def on_log(rec: dict) -> None:
            ctx.progress(rec["step"] / steps, f"teacher step {rec['step']} loss {rec['loss']:.4f} "
                                              f"({rec['images_per_s']:.0f} images/s)")

        train_edm_teacher(uris["dataset"], cfg.teacher.model_copy(update={"device": cfg.device}), out,
                          progress=ctx.progress_bars, on_log=on_log, on_resume=resumed.append)
        check_teacher(out, cfg.conditional)
        return {"resumed_from_step": resumed[0] if resumed else None}

    def summary(self, cfg, uris, out):
        from pipeline.storage.manifests import read_teacher_manifest
        m = read_teacher_manifest(out)
        return {"uri": out, "version": m.id, "sha256": m.weights_sha256, "given": bool(cfg.teacher_uri),
                "label_dim": m.model.label_dim, "final_loss": m.final_loss}

    def lineage(self, s):
        return (f"teacher `{s['version']}` ({'given' if s['given'] else 'bootstrapped'}, "
                f"sha256 `{s['sha256'][:16]}`)")


class PerceptualNet(DevicePooled):
    """The CIFAR network of the ``lpips-own`` training distance (pipeline.training.perceptual), trained on the
    dataset's train split and checked to be independent of the evaluation's extractor (a stage of the
    recipe only when the student trains with ``lpips-own``)."""

    name, kind, inputs = "perceptual", "perceptual-nets", ("dataset", "extractor")

    def output(self, cfg, uris):
        from pipeline.training.perceptual import perceptual_stage_version
        return artifacts.join(cfg.root, "perceptual-nets",
                              perceptual_stage_version(self.version(uris["dataset"]), cfg.perceptual))

    def device(self, cfg):
        return cfg.perceptual.device

    def run(self, cfg, uris, out, ctx):
        from pipeline.training.perceptual import train_perceptual_net
        p = cfg.perceptual
        train_perceptual_net(uris["dataset"], p.train, out, extractor_uri=uris["extractor"], device=p.device,
                             train_images=p.train_images, progress=ctx.progress_bars)
        return {}

    def summary(self, cfg, uris, out):
        from pipeline.evaluation import features
        from pipeline.training.perceptual import check_independent, perceptual_summary, read_perceptual_manifest
        check_independent(read_perceptual_manifest(out), features.read_extractor_manifest(uris["extractor"]))
        return {**perceptual_summary(out), "version": self.version(out)}

    def lineage(self, s):
        return f"perceptual network `{s['id']}` (test accuracy {s['test_accuracy']}, sha256 `{s['sha256'][:16]}`)"


class ImageFilter(PairStoreStage, DevicePooled):
    """Privacy filter + dedup of image pairs (pipeline.pairs.filter_images): non-finite, duplicate seeds,
    exact duplicates, copies of training images, blocklisted images, near duplicates; a new pair-store
    version with a count per reason."""

    name, inputs, lineage_name = "filter", ("pairs", "dataset"), "filtered"

    def output(self, cfg, uris):
        from pipeline.pairs.filter_images import blocklist_digest, image_filter_version
        f = cfg.filter
        block_sha = blocklist_digest(f.blocklist_uri) if f.blocklist_uri else None
        # the inputs' versions are their URIs' last parts: the plan knows this one before they exist
        return artifacts.join(cfg.root, "pairs", image_filter_version(
            self.version(uris["pairs"]), f, self.version(uris["dataset"]), block_sha))

    def device(self, cfg):
        return cfg.filter.device

    def summary(self, cfg, uris, out):
        from pipeline.pairs.filter_images import GRID_FILE, REPORT_FILE
        extra = {"report_uri": artifacts.join(out, REPORT_FILE)}
        if artifacts.exists(artifacts.join(out, GRID_FILE)):
            extra["grid"] = artifacts.join(out, GRID_FILE)
        return {**super().summary(cfg, uris, out), **extra}

    def run(self, cfg, uris, out, ctx):
        from pipeline.pairs.filter_images import filter_image_pairs
        filter_image_pairs(uris["pairs"], cfg.filter, out, dataset_uri=uris["dataset"], progress=ctx.progress_bars,
                           device=cfg.filter.device)
        return {}


class ImageStudent(Stage):
    """The image KDM student (``models.kdm_image``) trained by the image engine, ``<root>/students/<version>``;
    ``gpus`` > 1: ``kdm train-image`` under torchrun (DDP, the same version whatever the count)."""

    name, kind, inputs = "student", "students", ("filter",)
    progress_label = "KDM student training"

    def __init__(self, on_checkpoint=None, perceptual: bool = False):
        self.on_checkpoint = on_checkpoint     # (step, ema model): e.g. preview grids (one process only)
        if perceptual:                         # lpips-own: the perceptual stage's network is an input
            self.inputs = ("filter", "perceptual")

    @staticmethod
    def student_config(cfg, uris):
        """The student section, with the perceptual stage's network as ``train.perceptual_net`` (lpips-own)."""
        if "perceptual" not in uris:
            return cfg.student
        train = cfg.student.train.model_copy(update={"perceptual_net": uris["perceptual"]})
        return cfg.student.model_copy(update={"train": train})

    def output(self, cfg, uris):
        from pipeline.storage.pairstore import PairStore
        from pipeline.training.image_train import image_run_version
        if artifacts.exists(uris["filter"]):
            store = PairStore.open(uris["filter"])
            if store.manifest.num_classes and not cfg.student.model.label_dim:
                raise KDMError(f"pairs {uris['filter']} come from a class-conditional teacher "
                               f"({store.manifest.num_classes} classes) but the student is unconditional: set "
                               f"conditional=true")
        s = self.student_config(cfg, uris)
        return artifacts.join(cfg.root, "students", image_run_version(self.version(uris["filter"]), s.model, s.train))

    def pool(self, cfg):
        return GPU_POOL

    def device(self, cfg):
        return cfg.device

    def run(self, cfg, uris, out, ctx: StageContext):
        from pipeline.training.image_train import train_image_student
        s, device, gpus = self.student_config(cfg, uris), cfg.device, cfg.gpus
        train_cfg = s.train.model_copy(update={"device": device})
        if gpus == 1:
            steps = train_cfg.steps
            resumed: list[int] = []

            def on_log(rec: dict) -> None:
                rate = rec.get("train_pairs_per_s")
                ctx.progress(rec["step"] / steps, f"student step {rec['step']} loss "
                                                  f"{rec.get('loss_total', float('nan')):.4f} "
                                                  f"({rate or rec['pairs_per_s']:.0f} pairs/s"
                                                  f"{'' if rate else ', warm-up'})")

            train_image_student(uris["filter"], s.model, train_cfg, out, device=device, preset=s.preset,
                                progress=ctx.progress_bars, on_log=on_log, on_resume=resumed.append,
                                on_checkpoint=self.on_checkpoint)
            if resumed:
                ctx.log(f"student {self.version(out)} resumed from its step-{resumed[0]} checkpoint")
            ctx.log(steady_rate_line(out, train_cfg.batch_size))
            return {"resumed_from_step": resumed[0] if resumed else None}
        from pipeline.training.torchrun import run_kdm_command
        if self.on_checkpoint is not None:
            raise KDMError("student stage: on_checkpoint needs gpus=1 (the torchrun processes train elsewhere)")
        if train_cfg.batch_size % gpus:
            raise KDMError(f"student stage: train.batch_size {train_cfg.batch_size} is not divisible by gpus={gpus} "
                           f"(each process takes batch_size / gpus pairs per step)")
        run_kdm_command(gpus, device, ["train-image", "--pairs", uris["filter"], "--device", device, "--out", out],
                        s.model_copy(update={"train": train_cfg}).model_dump(mode="json"), "student stage",
                        quiet=not ctx.progress_bars)
        return {}

    def summary(self, cfg, uris, out):
        from pipeline.training.image_train import read_image_student_manifest
        m = read_image_student_manifest(out)
        return {"uri": out, "version": m.version, "weights_sha256": m.weights_sha256, "resumed_from_step": None,
                "steps": m.steps_done, "nonfinite_steps": m.nonfinite_steps, "final_losses": m.final_losses,
                "train_seconds": m.train_seconds, "steady_pairs_per_s": m.steady_pairs_per_s,
                "trainable_parameters": m.trainable_parameters}

    def lineage(self, s):
        rate = f", {s['steady_pairs_per_s']:,.0f} pairs/s in steady state" if s.get("steady_pairs_per_s") else ""
        return (f"student `{s['version']}` ({s['trainable_parameters']:,} parameters, {s['steps']} steps, "
                f"{s['train_seconds']:.0f} s{rate})")


def steady_rate_line(out: str, batch_size: int) -> str:
    """The student stage's closing log line: its steady-state training rate, as the manifest records it."""
    from pipeline.training.image_train import read_image_student_manifest
    m = read_image_student_manifest(out)
    if m.steady_pairs_per_s is None:
        return (f"student: {m.steps_done} steps in {m.train_seconds:.1f} s; no steady-state rate (no log interval "
                f"began after the warm-up)")
    return (f"student: {m.steps_done} steps x {batch_size} in {m.train_seconds:.1f} s; steady state "
            f"{m.steady_pairs_per_s:,.0f} pairs/s ({m.steady_pairs_per_s / batch_size:.2f} steps/s; warm-up, "
            f"checkpoint writes and hooks left out, as bench/bench_kdm_image.py times a step)")


class ImageEvaluation(Stage):
    """FD/KID of teacher and student against the train split and their ratio, student-vs-teacher MSE
    (LPIPS when its weights exist) on the held-out seeds, grids (pipeline.evaluation.evaluate_image)."""

    name, kind = "evaluation", "evaluations"

    def __init__(self, with_teacher: bool = False):
        # the teacher network is an input only when its sampler is cut short (evaluation.teacher_nfe)
        self.inputs = ("dataset", "extractor", "filter", "student") + (("teacher",) if with_teacher else ())

    def output(self, cfg, uris):
        from pipeline.evaluation.evaluate_image import evaluation_version_of
        return artifacts.join(cfg.root, "evaluations", evaluation_version_of(
            uris["dataset"], uris["extractor"], uris["filter"], uris["student"], cfg.evaluation))

    def pool(self, cfg):
        return GPU_POOL

    def device(self, cfg):
        return cfg.device

    def run(self, cfg, uris, out, ctx):
        from pipeline.evaluation.evaluate_image import evaluate_image
        evaluate_image(out, uris["dataset"], uris["extractor"], uris["filter"], uris["student"], cfg.evaluation,
                       cfg.device, cfg.root, teacher_uri=uris.get("teacher"))
        return {}

    def summary(self, cfg, uris, out):
        from pipeline.evaluation.evaluate_image import read_evaluation_manifest
        m = read_evaluation_manifest(out)
        return {"uri": out, "version": m.version, "report": artifacts.join(out, m.report_file),
                "num_samples": m.num_samples, "metric_names": m.metric_names, "plots": m.plots, "notes": m.notes,
                **m.summary}


def headline(ev: dict) -> str:
    """The report's first line: the FD ratio, the training distance and, for a collapsed student, the flag."""
    text = f"FD ratio student / teacher: **{ev['fd_ratio']:.3f}**"
    pr = [ev.get(k) for k in ("precision_student", "recall_student", "precision_teacher", "recall_teacher")]
    if None not in pr:
        text += f"; precision / recall student {pr[0]:.3f} / {pr[1]:.3f}, teacher {pr[2]:.3f} / {pr[3]:.3f}"
    if ev.get("notes", {}).get("training_distance"):
        text += f"; student trained with `{ev['notes']['training_distance']}`"
    if ev.get("notes", {}).get("collapse"):
        text += f"\n\n**Student {ev['notes']['collapse']}**"
    return text


def report_parts(cfg, results: dict) -> dict:
    """The recipe-specific parts of the run report: title, metric rows, protocol, headline."""
    from pipeline.evaluation import image_metrics
    ev = results["evaluation"]
    report = image_metrics.read_report(ev["report"])
    rows = [{"metric": m.name, "subject": m.subject, "value": m.value, "std": m.std, "stderr": m.stderr,
             "n": m.protocol.num_samples, "seeds": m.protocol.seeds.text(), "split": m.protocol.split}
            for m in report.metrics]
    rows.append({"metric": f"{ev['metric_names']['fd']} ratio", "subject": "student / teacher",
                 "value": ev["fd_ratio"], "std": None, "stderr": None, "n": ev["num_samples"],
                 "seeds": rows[0]["seeds"], "split": "train"})
    first = report.metrics[0].protocol
    protocol = (f"Protocol: n = {ev['num_samples']} teacher / one-step student outputs from the held-out seeds "
                f"{first.seeds.text()} (same noise for both), quantised with EDM's uint8 formula; "
                f"{ev['metric_names']['fd']} and {ev['metric_names']['kid']} against the train split "
                f"(reference `{first.reference.id}`, {first.reference.num_images} images) on the offline extractor "
                f"`{first.feature_extractor.id}` (not FID); KID over "
                f"{first.kid_subsets} subsets of {first.kid_subset_size}; MSE on the float outputs. Dataset: "
                f"{ev['notes'].get('dataset_source') or results['dataset'].get('source', 'source not recorded')}.")
    d, t = results["dataset"], results["teacher"]
    key = f"cifar10-{d['version'].removeprefix('ds-')[:8]}-{t['version']}"
    notes = [f"{k}: {v}" for k, v in ev["notes"].items()]
    f = results.get("filter")
    if f is not None:
        from pipeline.pairs.filter_images import read_filter_report, report_markdown
        notes.append("### Privacy filter and dedup\n\n" + report_markdown(read_filter_report(f["uri"])))
    return {"title": f"KDM distillation: CIFAR-10 ({cfg.preset}{', class-conditional' if cfg.conditional else ''})",
            "key": key, "metrics": rows,
            "metrics_description": f"teacher and student vs the train split, student vs teacher on held-out seeds "
                                   f"({ev['num_samples']} samples)",
            "headline": headline(ev), "protocol": protocol,
            "table_text": image_metrics.metrics_markdown(report.metrics), "notes": notes}


def stages(cfg) -> list[Stage]:
    own = cfg.student.model.distance == "lpips-own"
    return [Dataset(), Extractor(), *([PerceptualNet()] if own else []), EDMTeacher(), PairsStage(), ImageFilter(),
            ImageStudent(perceptual=own), ImageEvaluation(with_teacher=bool(cfg.evaluation.teacher_nfe))]
