"""Teacher pair generation: per-seed noise -> teacher ODE -> chunk-aligned shards of one Zarr store.

A pair is a function of (teacher, sampler settings, seed) only. Arrays are sized once up front; each
shard writes whole chunks, then a marker; a restarted run skips shards whose marker exists, so a run
killed at any point and restarted with the same command ends byte-identical to an uninterrupted one.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from models.samplers import integrate_ode, seeded_noise
from storage_schemas import (HELDOUT_GROUP, MANIFEST_KEY, PairsGenerateConfig, SeedRange, TeacherRef,
                             code_version, recipe_version, stable_hash, utc_now)

from . import artifacts, pairstore
from .devices import resolve_device
from .teacher import load_teacher, read_teacher_manifest

PROGRESS_DIR = "_kdm_progress"


def pairs_version(teacher_id: str, cfg: PairsGenerateConfig) -> str:
    return "pairs-" + stable_hash(recipe_version(), "generate", teacher_id,
                                  cfg.model_dump(mode="json", exclude={"device"}))


def _shard_marker(group_url: str, index: int) -> str:
    return artifacts.join(group_url, PROGRESS_DIR, f"shard-{index:06d}.done")


def _partial_version(url: str) -> Optional[str]:
    """The version whose shards a killed run left at ``url`` ('' if unknown); None when nothing is there."""
    if not artifacts.exists(artifacts.join(url, "zarr.json")):
        return None
    attrs = pairstore.open_group(url, "r").attrs
    if MANIFEST_KEY in attrs:
        return attrs[MANIFEST_KEY].get("version", "")
    return attrs.get(pairstore.WRITING_KEY, "")


def _fill(group_url: str, seeds: SeedRange, cfg: PairsGenerateConfig, velocity, device: torch.device,
          sample_shape: tuple[int, ...], progress: bool, on_shard: Optional[Callable[[int, int], None]],
          version: str) -> None:
    n, c = len(seeds), cfg.chunk_size
    # (Re)create unless every array exists: a kill inside create_arrays leaves a group without all of them.
    if not all(artifacts.exists(artifacts.join(group_url, a, "zarr.json")) for a in pairstore.PAIR_ARRAYS):
        pairstore.create_arrays(group_url, n, sample_shape, c).attrs[pairstore.WRITING_KEY] = version
    group = pairstore.open_group(group_url, "r+")
    shards = range((n + c - 1) // c)
    todo = [i for i in shards if not artifacts.exists(_shard_marker(group_url, i))]
    bar = tqdm(total=n, initial=(len(shards) - len(todo)) * c if todo else n, desc=f"pairs {seeds.text()}",
               unit="pair", disable=not progress, mininterval=1.0)
    t0, done = time.time(), 0
    for i in todo:
        lo = seeds.start + i * c
        hi = min(lo + c, seeds.stop)
        seed_list = list(range(lo, hi))
        x_T = seeded_noise(seed_list, sample_shape, scale=cfg.sampler.noise_scale)
        with torch.no_grad():
            x_0 = integrate_ode(velocity, x_T.to(device), cfg.sampler.steps, cfg.sampler.method).cpu()
        pairstore.write_region(group, i * c, {
            "x_T": x_T.numpy(), "x_0": x_0.numpy(),
            "label": np.full(hi - lo, -1, np.int32), "seed": np.arange(lo, hi, dtype=np.int64)})
        artifacts.write_bytes(_shard_marker(group_url, i), b"")
        done += hi - lo
        bar.update(hi - lo)
        bar.set_postfix(pairs_per_s=f"{done / max(time.time() - t0, 1e-9):.0f}")
        if on_shard is not None:
            on_shard(i, len(todo))
    bar.close()


def generate_pairs(teacher_url: str, cfg: PairsGenerateConfig, out: str, progress: bool = True,
                   on_shard: Optional[Callable[[int, int], None]] = None) -> str:
    """Generate (or find) the pair store at ``out``; returns its version."""
    teacher_manifest = read_teacher_manifest(teacher_url)
    version = pairs_version(teacher_manifest.id, cfg)
    if artifacts.check_target(out, version, pairstore.read_store_manifest):
        return version
    model, manifest = load_teacher(teacher_url, cfg.device)
    device = resolve_device(cfg.device)
    sample_shape = (manifest.model.dim,)
    tmp = artifacts.begin(out)          # keeps finished shards of a killed run
    if _partial_version(tmp) not in (None, version):
        tmp = artifacts.begin(out, fresh=True)   # left by a run of another config: its shards are not ours
    common = dict(origin="teacher", chunk_size=cfg.chunk_size, sampler=cfg.sampler,
                  teacher=TeacherRef(id=manifest.id, sha256=manifest.weights_sha256, kind=manifest.kind),
                  x_T_scale=cfg.sampler.noise_scale, num_classes=0, code_version=code_version())
    splits = [("train", tmp, cfg.seeds)]
    if cfg.heldout_seeds is not None:
        splits.append(("heldout", artifacts.join(tmp, HELDOUT_GROUP), cfg.heldout_seeds))
    for _, url, seeds in splits:
        _fill(url, seeds, cfg, model, device, sample_shape, progress, on_shard, version)
    # Commit: children first, the root manifest last, then the rename.
    for split, url, seeds in reversed(splits):
        fs, path = artifacts.url_to_fs(artifacts.join(url, PROGRESS_DIR))
        if fs.exists(path):
            fs.rm(path, recursive=True)
        group = pairstore.open_group(url, "r+")
        pairstore.finalize(group, version=version if split == "train" else f"{version}-heldout", split=split,
                           seeds=seeds, created=utc_now(), **common)
    artifacts.commit(out)
    return version
