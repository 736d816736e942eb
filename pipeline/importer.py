"""Import external pairs into a pair store.

``kdm-trajectories`` is the official KDM checkerboard format: float32 (T, N, D) snapshots of the
teacher ODE, x_T = [0], x_0 = [-1]. The seed array holds each pair's index in the source file; the
train/held-out split is a permutation drawn from ``split_seed``, so it is deterministic.
"""
from __future__ import annotations

import io

import numpy as np

from storage_schemas import HELDOUT_GROUP, ImportInfo, PairsImportConfig, code_version, recipe_version, stable_hash, utc_now

from . import artifacts, pairstore
from .errors import KDMError


def load_trajectories(src: str) -> tuple[np.ndarray, str]:
    try:
        raw = artifacts.read_bytes(src)
    except FileNotFoundError:
        raise KDMError(f"import source {src} does not exist") from None
    try:
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
    except ValueError as e:
        raise KDMError(f"{src} is not a plain .npy array ({e})") from None
    if arr.ndim != 3 or arr.shape[0] < 2:
        raise KDMError(f"{src}: format kdm-trajectories expects a (T, N, D) array with T >= 2, got shape {arr.shape}")
    return arr, artifacts.sha256_bytes(raw)


def split_indices(n: int, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_hold = int(round(n * holdout_fraction))
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


def import_pairs(src: str, cfg: PairsImportConfig, out: str) -> str:
    arr, sha = load_trajectories(src)
    version = "import-" + stable_hash(recipe_version(), "import", sha, cfg)
    if artifacts.check_target(out, version, pairstore.read_store_manifest):
        return version
    x_T_all, x_0_all = arr[0].astype(np.float32), arr[-1].astype(np.float32)
    train_idx, held_idx = split_indices(arr.shape[1], cfg.holdout_fraction, cfg.split_seed)
    info = ImportInfo(format=cfg.format, source_uri=str(src), source_sha256=sha,
                      holdout_fraction=cfg.holdout_fraction, split_seed=cfg.split_seed)
    tmp = artifacts.begin(out, fresh=True)
    splits = [("train", tmp, train_idx)]
    if len(held_idx):
        splits.append(("heldout", artifacts.join(tmp, HELDOUT_GROUP), held_idx))
    groups = []
    for split, url, idx in splits:          # root first: creating it would wipe an existing child
        group = pairstore.create_arrays(url, len(idx), x_0_all.shape[1:], cfg.chunk_size)
        pairstore.write_region(group, 0, {"x_T": x_T_all[idx], "x_0": x_0_all[idx],
                                          "label": np.full(len(idx), -1), "seed": idx.astype(np.int64)})
        groups.append((split, group))
    for split, group in reversed(groups):   # the root manifest is the last write
        pairstore.finalize(group, version=version if split == "train" else f"{version}-heldout", split=split,
                           origin="import", chunk_size=cfg.chunk_size, import_info=info, x_T_scale=1.0,
                           code_version=code_version(), created=utc_now())
    artifacts.commit(out)
    return version
