"""The pipeline's stages over one artifact root, content-addressed:

  <root>/teachers/<id>/      <root>/pairs/<version>/      <root>/students/<version>/
  <root>/evaluations/<version>/report.json

Each function takes URIs + typed configs and returns a small dict (URI, version, summary numbers),
never arrays; a stage whose output version already exists returns at once (``skipped: True``), and a
student run that failed part-way resumes from its newest checkpoint (``resumed_from_step``). The root
is a local path or an fsspec URL (``s3://bucket/prefix``): every stage reads and writes through it.
These are what the Prefect flow's tasks call; they run without Prefect too (``kdm distill``).
"""
from __future__ import annotations

from typing import Callable, Optional

from storage_schemas import (CheckerboardSpec, DistillCheckerboardConfig, Eval2DConfig, FilterConfig,
                             PairsGenerateConfig, PairsImportConfig, StudentRunConfig, TeacherTrainConfig,
                             recipe_version, stable_hash)

from pipeline.storage import artifacts
from pipeline.evaluation import evaluate2d as evaluate
from pipeline.pairs import filter as filt
from pipeline.pairs import generate
from pipeline.pairs import importer
from pipeline.teachers import flow_matching as teacher
from pipeline.training import train2d as train
from pipeline.storage.pairstore import PairStore


def _out(root: str, kind: str, version: str) -> str:
    return artifacts.join(root, kind, version)


def stage_teacher(root: str, cfg: TeacherTrainConfig, progress: bool = True) -> dict:
    version = teacher.teacher_version(cfg)
    out = _out(root, "teachers", version)
    skipped = artifacts.committed(out)
    m = teacher.train_teacher(cfg, out, progress=progress)
    return {"uri": out, "version": m.id, "sha256": m.weights_sha256, "skipped": skipped,
            "final_loss": m.final_loss}


def stage_generate(root: str, teacher_uri: str, cfg: PairsGenerateConfig, progress: bool = True,
                   on_shard: Optional[Callable[[int, int], None]] = None) -> dict:
    version = generate.pairs_version(teacher.read_teacher_manifest(teacher_uri).id, cfg)
    out = _out(root, "pairs", version)
    skipped = artifacts.exists(out)
    generate.generate_pairs(teacher_uri, cfg, out, progress=progress, on_shard=on_shard)
    return _pairs_summary(out, skipped)


def stage_import(root: str, src: str, cfg: PairsImportConfig) -> dict:
    version = importer.import_version(src, cfg)
    out = _out(root, "pairs", version)
    skipped = artifacts.exists(out)
    importer.import_pairs(src, cfg, out)
    return _pairs_summary(out, skipped)


def stage_filter(root: str, pairs_uri: str, cfg: FilterConfig) -> dict:
    src = PairStore.open(pairs_uri).manifest
    block_sha = artifacts.sha256_file(cfg.blocklist_uri) if cfg.blocklist_uri else None
    out = _out(root, "pairs", filt.filter_version(src.version, cfg, block_sha))
    skipped = artifacts.exists(out)
    _, counts = filt.filter_pairs(pairs_uri, cfg, out)
    return _pairs_summary(out, skipped) | {"counts": counts}


def _pairs_summary(uri: str, skipped: bool) -> dict:
    s = PairStore.open(uri)
    held = s.heldout()
    return {"uri": uri, "version": s.version, "content_hash": s.manifest.content_hash, "count": len(s),
            "heldout_count": len(held) if held else 0, "skipped": skipped}


def stage_train(root: str, pairs_uri: str, cfg: StudentRunConfig, progress: bool = True,
                on_log: Optional[Callable[[dict], None]] = None) -> dict:
    version = train.run_version(PairStore.open(pairs_uri).version, cfg)
    out = _out(root, "students", version)
    skipped = artifacts.committed(out)
    resumed: list[int] = []
    train.train_student(pairs_uri, cfg, out, progress=progress, on_log=on_log, on_resume=resumed.append)
    m = train.read_student_manifest(out)
    return {"uri": out, "version": version, "weights_sha256": m.weights_sha256, "skipped": skipped,
            "resumed_from_step": resumed[0] if resumed else None,
            "steps": m.steps_done, "final_losses": m.final_losses, "train_seconds": m.train_seconds,
            "trainable_parameters": m.trainable_parameters}


def stage_evaluate(root: str, student_uri: str, pairs_uri: str, cfg: Eval2DConfig,
                   board: Optional[CheckerboardSpec] = None) -> dict:
    student = train.read_student_manifest(student_uri)
    pairs = PairStore.open(pairs_uri)
    version = "eval-" + stable_hash(recipe_version(), "evaluate", student.version, pairs.version, cfg, board)
    out = _out(root, "evaluations", version)
    skipped = artifacts.exists(artifacts.join(out, evaluate.REPORT))
    if not skipped:
        tmp = artifacts.begin(out, fresh=True)
        evaluate.evaluate_student(student_uri, pairs_uri, cfg, tmp, board=board)
        artifacts.commit(out, markers=(evaluate.REPORT,))
    report = evaluate.read_report(out)
    return {"uri": out, "report": artifacts.join(out, evaluate.REPORT), "version": version, "skipped": skipped,
            "table": evaluate.metrics_table(report)}


def resolve_paths(cfg: DistillCheckerboardConfig, base) -> DistillCheckerboardConfig:
    """Relative local paths (root, import_uri) are taken relative to ``base`` (the repository)."""
    from pathlib import Path
    upd = {}
    for key in ("root", "import_uri"):
        v = getattr(cfg, key)
        if v and artifacts.is_local(v) and not Path(v).is_absolute():
            upd[key] = str((Path(base) / v).resolve())
    return cfg.model_copy(update=upd)


def run_distill(cfg: DistillCheckerboardConfig, progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """The whole checkerboard pipeline without Prefect (what `kdm distill` runs)."""
    root = cfg.root
    results: dict = {}
    board = cfg.teacher.data
    if cfg.source == "teacher":
        results["teacher"] = stage_teacher(root, cfg.teacher, progress)
        log(f"teacher   {results['teacher']['uri']}")
        results["pairs"] = stage_generate(root, results["teacher"]["uri"], cfg.pairs, progress)
    else:
        results["pairs"] = stage_import(root, cfg.import_uri, cfg.import_config)
    log(f"pairs     {results['pairs']['uri']} ({results['pairs']['count']} + {results['pairs']['heldout_count']} held out)")
    results["filtered"] = stage_filter(root, results["pairs"]["uri"], cfg.filter)
    log(f"filtered  {results['filtered']['uri']} {results['filtered']['counts']}")
    results["student"] = stage_train(root, results["filtered"]["uri"], cfg.student, progress)
    log(f"student   {results['student']['uri']}")
    results["evaluation"] = stage_evaluate(root, results["student"]["uri"], results["filtered"]["uri"],
                                           cfg.evaluation, board)
    log(f"report    {results['evaluation']['report']}")
    return results
