"""Privacy filter + dedup stage: a new store version holding the pairs that survive.

Reasons, applied in this order (a pair is counted under the first reason that drops it):
``nonfinite`` (NaN/Inf in x_T or x_0), ``duplicate_seed`` (a seed seen earlier), ``blocklist`` (x_0
within ``blocklist_radius`` of a user-given point: memorised or forbidden content), and
``near_duplicate`` (x_0 within ``near_duplicate_radius`` of an earlier kept x_0). The output records
its source version, the kept indices (array ``source_index``) and a count per reason. The held-out
split is copied unchanged: it is evaluation reference, not training data. Trajectory snapshots (``x_t``)
travel with their pairs (a snapshot with NaN/Inf drops its pair under ``nonfinite``).
"""
from __future__ import annotations

import io

import numpy as np

from storage_schemas import HELDOUT_GROUP, FilterConfig, FilterRecord, VersionInputs, code_version, recipe_version, stable_hash, utc_now

from pipeline.storage import artifacts
from pipeline.storage import pairstore
from pipeline.errors import KDMError
from pipeline.storage.pairstore import PairStore

REASONS = ("nonfinite", "duplicate_seed", "blocklist", "near_duplicate")


def load_blocklist(uri: str, sample_shape: tuple[int, ...]) -> np.ndarray:
    try:
        pts = np.load(io.BytesIO(artifacts.read_bytes(uri)), allow_pickle=False)
    except FileNotFoundError:
        raise KDMError(f"blocklist {uri} does not exist") from None
    if pts.ndim == len(sample_shape):
        pts = pts[None]
    if tuple(pts.shape[1:]) != tuple(sample_shape):
        raise KDMError(f"blocklist {uri} has points of shape {pts.shape[1:]}, the pairs have {sample_shape}")
    return pts.reshape(len(pts), -1).astype(np.float64)


def select(data: dict[str, np.ndarray], cfg: FilterConfig, blocklist: np.ndarray | None
           ) -> tuple[np.ndarray, dict[str, int]]:
    """Pure selection: returns (kept indices, dropped count per reason)."""
    from scipy.spatial import cKDTree     # scipy only where the distances are searched
    n = len(data["seed"])
    x0 = data["x_0"].reshape(n, -1).astype(np.float64)
    keep = np.ones(n, bool)
    counts = {r: 0 for r in REASONS}

    def drop(mask: np.ndarray, reason: str) -> None:
        mask = mask & keep
        counts[reason] += int(mask.sum())
        keep[mask] = False

    if cfg.drop_nonfinite:
        finite = np.isfinite(data["x_T"].reshape(n, -1)).all(1) & np.isfinite(x0).all(1)
        if "x_t" in data:
            finite &= np.isfinite(data["x_t"].reshape(n, -1)).all(1)
        drop(~finite, "nonfinite")
    if cfg.dedup_seeds:
        alive = np.flatnonzero(keep)        # the first *surviving* row of each seed is kept
        _, first = np.unique(data["seed"][alive], return_index=True)
        dup = np.ones(n, bool)
        dup[alive[first]] = False
        drop(dup, "duplicate_seed")
    if blocklist is not None and len(blocklist):
        dist, _ = cKDTree(blocklist).query(np.where(keep[:, None], x0, 0.0), k=1)
        drop(dist <= cfg.blocklist_radius, "blocklist")
    if cfg.near_duplicate_radius > 0:
        idx = np.flatnonzero(keep)
        pairs = cKDTree(x0[idx]).query_pairs(cfg.near_duplicate_radius, output_type="ndarray")
        near = np.zeros(n, bool)
        if len(pairs):
            neighbours: dict[int, list[int]] = {}
            for a, b in pairs:
                lo, hi = (a, b) if a < b else (b, a)
                neighbours.setdefault(int(hi), []).append(int(lo))
            kept_local = np.ones(len(idx), bool)
            for j in sorted(neighbours):
                if any(kept_local[i] for i in neighbours[j]):
                    kept_local[j] = False
            near[idx[~kept_local]] = True
        drop(near, "near_duplicate")
    counts["kept"] = int(keep.sum())
    return np.flatnonzero(keep), counts


def filter_version_inputs(source_version: str, cfg: FilterConfig, blocklist_sha: str | None) -> VersionInputs:
    return VersionInputs.of("filtered", recipe_version(), "filter", source_version, cfg, blocklist_sha)


def filter_version(source_version: str, cfg: FilterConfig, blocklist_sha: str | None) -> str:
    return filter_version_inputs(source_version, cfg, blocklist_sha).version


def filter_pairs(src: str, cfg: FilterConfig, out: str) -> tuple[str, dict[str, int]]:
    source = PairStore.open(src)
    m = source.manifest
    block = load_blocklist(cfg.blocklist_uri, m.sample_shape) if cfg.blocklist_uri else None
    block_sha = artifacts.sha256_file(cfg.blocklist_uri) if cfg.blocklist_uri else None
    version = filter_version(m.version, cfg, block_sha)
    if artifacts.check_target(out, version, pairstore.read_store_manifest):
        return version, dict(PairStore.open(out).manifest.filter.counts)
    data = source.load(source.pair_arrays)
    kept, counts = select(data, cfg, block)
    record = FilterRecord(source_version=m.version, source_content_hash=m.content_hash,
                          config_hash=stable_hash(cfg, block_sha), counts=counts)
    tmp = artifacts.begin(out, fresh=True)
    k = m.snapshots.count if m.snapshots else 0
    root = pairstore.create_arrays(tmp, len(kept), m.sample_shape, m.chunk_size, extra=("source_index",), snapshots=k)
    pairstore.write_region(root, 0, {k: v[kept] for k, v in data.items()} | {"source_index": kept})
    held = source.heldout()
    if held is not None:
        hm = held.manifest
        child = pairstore.create_arrays(artifacts.join(tmp, HELDOUT_GROUP), len(held), hm.sample_shape,
                                        hm.chunk_size, snapshots=hm.snapshots.count if hm.snapshots else 0)
        pairstore.write_region(child, 0, held.load(held.pair_arrays))
        pairstore.finalize(child, **(hm.model_dump(exclude={"content_hash", "arrays", "count", "sample_shape",
                                                            "chunk_digests", "code_version", "created"})
                                     | {"code_version": code_version(), "created": utc_now()}))
    inherited = m.model_dump(include={"seeds", "teacher", "sampler", "x_T_scale", "num_classes", "import_info",
                                      "snapshots"})
    pairstore.finalize(root, version=version, split="train", origin="filter", chunk_size=m.chunk_size,
                       filter=record, code_version=code_version(), created=utc_now(),
                       version_inputs=filter_version_inputs(m.version, cfg, block_sha), **inherited)
    artifacts.commit(out)
    return version, counts
