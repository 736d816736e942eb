"""Importing kdm-trajectories files and the privacy/dedup filter stage."""
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.storage import artifacts
from pipeline.pairs import importer
from pipeline.storage import pairstore
from pipeline.pairs import filter as filt
from pipeline.errors import ArtifactExists, KDMError
from pipeline.storage.pairstore import PairStore
from storage_schemas import FilterConfig, ImportInfo, PairsImportConfig


@pytest.fixture(scope="module")
def traj(tmp_path_factory):
    """float32 (T=3, N=1000, D=2) trajectories; returns (path, array)."""
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(3, 1000, 2)).astype(np.float32)
    path = tmp_path_factory.mktemp("src") / "traj.npy"
    np.save(path, arr)
    return str(path), arr


def do_import(src, out, holdout=0.2, split_seed=0, chunk=300):
    cfg = PairsImportConfig(holdout_fraction=holdout, split_seed=split_seed, chunk_size=chunk)
    return importer.import_pairs(src, cfg, str(out))


# --- import ------------------------------------------------------------------------------------------

def test_import_splits_deterministically(traj, tmp_path):
    src, arr = traj
    v1 = do_import(src, tmp_path / "a")
    v2 = do_import(src, tmp_path / "b")
    v3 = do_import(src, tmp_path / "c", split_seed=1)
    assert v1 == v2 != v3
    a, b, c = (PairStore.open(str(tmp_path / n)) for n in "abc")
    assert len(a) == 800 and len(a.heldout()) == 200
    sa, ha = a.group["seed"][:], a.heldout().group["seed"][:]
    assert np.array_equal(sa, b.group["seed"][:]) and np.array_equal(ha, b.heldout().group["seed"][:])
    assert a.manifest.content_hash == b.manifest.content_hash
    assert not np.array_equal(sa, c.group["seed"][:])
    # the two splits partition the source indices, each sorted
    assert np.array_equal(np.sort(np.concatenate([sa, ha])), np.arange(1000))
    assert np.all(np.diff(sa) > 0) and np.all(np.diff(ha) > 0)


def test_import_takes_first_and_last_snapshot(traj, tmp_path):
    src, arr = traj
    do_import(src, tmp_path / "s")
    for store in (PairStore.open(str(tmp_path / "s")), PairStore.open(str(tmp_path / "s")).heldout()):
        d = store.load()
        idx = d["seed"]
        assert d["x_T"].dtype == np.float32 and d["seed"].dtype == np.int64 and d["label"].dtype == np.int32
        assert np.array_equal(d["x_T"], arr[0][idx])
        assert np.array_equal(d["x_0"], arr[-1][idx])
        assert np.all(d["label"] == -1)


def test_import_manifest_records_the_source(traj, tmp_path):
    src, _ = traj
    v = do_import(src, tmp_path / "m", holdout=0.2, split_seed=3, chunk=300)
    s = PairStore.open(str(tmp_path / "m"))
    m = s.manifest
    assert m.version == v and v.startswith("import-")
    assert m.origin == "import" and m.split == "train" and m.teacher is None and m.sampler is None
    assert m.import_info == ImportInfo(format="kdm-trajectories", source_uri=src,
                                       source_sha256=artifacts.sha256_file(src), holdout_fraction=0.2,
                                       split_seed=3)
    assert m.chunk_size == 300 and s.group["x_0"].chunks == (300, 2)
    assert s.heldout().manifest.version == f"{v}-heldout" and s.heldout().manifest.split == "heldout"
    s.verify()
    s.heldout().verify()


def test_import_without_holdout_has_no_heldout_group(traj, tmp_path):
    src, arr = traj
    do_import(src, tmp_path / "h0", holdout=0.0)
    s = PairStore.open(str(tmp_path / "h0"))
    assert len(s) == 1000 and s.heldout() is None
    assert "heldout" not in set(zarr.open_group(str(tmp_path / "h0"), mode="r").group_keys())
    assert np.array_equal(s.group["seed"][:], np.arange(1000))


def test_import_is_idempotent_and_immutable(traj, tmp_path):
    src, _ = traj
    out = tmp_path / "idem"
    v = do_import(src, out)
    mtime = (out / "zarr.json").stat().st_mtime_ns
    assert do_import(src, out) == v
    assert (out / "zarr.json").stat().st_mtime_ns == mtime
    with pytest.raises(ArtifactExists, match="artifacts are immutable"):
        do_import(src, out, holdout=0.3)


def test_import_rejects_bad_shapes(tmp_path):
    flat = tmp_path / "flat.npy"
    np.save(flat, np.zeros((10, 2), np.float32))
    with pytest.raises(KDMError) as e:
        do_import(str(flat), tmp_path / "o1")
    assert "(T, N, D)" in str(e.value) and "(10, 2)" in str(e.value)
    single = tmp_path / "single.npy"
    np.save(single, np.zeros((1, 10, 2), np.float32))
    with pytest.raises(KDMError, match=r"T >= 2"):
        do_import(str(single), tmp_path / "o2")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_import_rejects_missing_and_non_npy_sources(tmp_path):
    with pytest.raises(KDMError, match="does not exist"):
        do_import(str(tmp_path / "missing.npy"), tmp_path / "o")
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"definitely not numpy")
    with pytest.raises(KDMError, match="not a .npy file"):
        do_import(str(junk), tmp_path / "o")
    junk.write_bytes(bytes(100))               # zero bytes: not "pickled data"
    with pytest.raises(KDMError, match="not a .npy file"):
        do_import(str(junk), tmp_path / "o")


def test_split_indices_rounding():
    tr, ho = importer.split_indices(10, 0.25, 0)
    assert len(tr) + len(ho) == 10 and len(ho) == 2   # round(2.5) -> 2 (banker's rounding)
    tr, ho = importer.split_indices(7, 0.0, 0)
    assert len(ho) == 0 and np.array_equal(tr, np.arange(7))


# --- filter: pure selection --------------------------------------------------------------------------

N = 20


def dirty_data():
    """20 well-separated pairs with one problem of each kind injected.

    row 3: NaN in x_0, row 7: inf in x_T                 -> nonfinite (2)
    row 10: same seed as row 2 (and the same x_0)        -> duplicate_seed (1), not near_duplicate
    row 15: x_0 within 0.01 of a blocklisted point       -> blocklist (1)
    rows 17, 18, 19: chain 0.0008 apart (radius 0.001)   -> near_duplicate drops 18 only (1)
    """
    x0 = np.stack([np.arange(N, dtype=np.float64), np.zeros(N)], 1).astype(np.float32)
    x0[18] = x0[17] + np.float32([0.0008, 0.0])
    x0[19] = x0[17] + np.float32([0.0016, 0.0])
    xT = np.random.default_rng(1).normal(size=(N, 2)).astype(np.float32)
    seed = np.arange(N, dtype=np.int64) + 100
    x0[3, 1] = np.nan
    xT[7, 0] = np.inf
    seed[10] = seed[2]
    x0[10] = x0[2]
    return {"x_T": xT, "x_0": x0, "label": np.full(N, -1, np.int32), "seed": seed}


BLOCK = np.array([[15.0, 0.01], [50.0, 50.0]])
DROPPED = {3, 7, 10, 15, 18}
CFG = FilterConfig(near_duplicate_radius=0.001, blocklist_radius=0.05)


def test_select_counts_each_reason_once():
    kept, counts = filt.select(dirty_data(), CFG, BLOCK)
    assert counts == {"nonfinite": 2, "duplicate_seed": 1, "blocklist": 1, "near_duplicate": 1, "kept": 15}
    assert kept.tolist() == [i for i in range(N) if i not in DROPPED]
    assert sum(v for k, v in counts.items() if k != "kept") + counts["kept"] == N


def test_select_switches():
    data = dirty_data()
    kept, counts = filt.select(data, FilterConfig(dedup_seeds=False, blocklist_radius=0.0), None)
    assert counts == {"nonfinite": 2, "duplicate_seed": 0, "blocklist": 0, "near_duplicate": 0, "kept": 18}
    assert 10 in kept and 15 in kept and 18 in kept
    # the blocklist radius is inclusive and measured on x_0
    kept, counts = filt.select(data, FilterConfig(blocklist_radius=0.01), np.array([[15.0, 0.01]]))
    assert counts["blocklist"] == 1 and 15 not in kept
    kept, counts = filt.select(data, FilterConfig(blocklist_radius=0.0099), np.array([[15.0, 0.01]]))
    assert counts["blocklist"] == 0
    # without dedup, row 10 is an exact near-duplicate of row 2
    kept, counts = filt.select(data, FilterConfig(dedup_seeds=False, near_duplicate_radius=0.001), None)
    assert counts["near_duplicate"] == 2 and 10 not in kept and 2 in kept and 18 not in kept


# --- filter: the stage -------------------------------------------------------------------------------

def write_store(url: str, data: dict, held: dict | None, chunk: int = 8) -> str:
    info = ImportInfo(format="kdm-trajectories", source_uri="test://src", source_sha256="0" * 64,
                      holdout_fraction=0.2, split_seed=0)
    common = dict(origin="import", chunk_size=chunk, import_info=info, code_version="test", created="now")
    root = pairstore.create_arrays(url, len(data["seed"]), (2,), chunk)
    pairstore.write_region(root, 0, data)
    if held is not None:
        child = pairstore.create_arrays(artifacts.join(url, "heldout"), len(held["seed"]), (2,), chunk)
        pairstore.write_region(child, 0, held)
        pairstore.finalize(child, version="src-store-0001-heldout", split="heldout", **common)
    pairstore.finalize(root, version="src-store-0001", split="train", **common)
    return url


@pytest.fixture()
def dirty_store(tmp_path):
    held = {"x_T": np.ones((6, 2), np.float32), "x_0": np.full((6, 2), 0.5, np.float32),
            "label": np.full(6, -1, np.int32), "seed": np.arange(6, dtype=np.int64) + 1000}
    held["x_0"][0, 0] = np.nan    # held-out data is copied unchanged, never filtered
    url = write_store(str(tmp_path / "src"), dirty_data(), held)
    block = tmp_path / "block.npy"
    np.save(block, BLOCK)
    return url, str(block)


def test_filter_stage_writes_a_new_version(dirty_store, tmp_path):
    src, block = dirty_store
    cfg = CFG.model_copy(update={"blocklist_uri": block})
    out = str(tmp_path / "filtered")
    version, counts = filt.filter_pairs(src, cfg, out)
    assert counts == {"nonfinite": 2, "duplicate_seed": 1, "blocklist": 1, "near_duplicate": 1, "kept": 15}
    assert version.startswith("filtered-")

    s = PairStore.open(out)
    m = s.manifest
    source = PairStore.open(src)
    assert m.version == version and m.origin == "filter" and m.split == "train" and m.count == 15
    assert m.filter.source_version == "src-store-0001"
    assert m.filter.source_content_hash == source.manifest.content_hash
    assert m.filter.counts == counts
    assert m.filter.kept_index_array == "source_index"
    assert m.import_info == source.manifest.import_info          # provenance is inherited
    assert "source_index" in m.arrays and m.arrays["source_index"].dtype == "int64"

    keep = [i for i in range(N) if i not in DROPPED]
    idx = s.group["source_index"][:]
    assert idx.tolist() == keep
    src_data = source.load()
    for name in ("x_T", "x_0", "label", "seed"):
        assert np.array_equal(s.group[name][:], src_data[name][keep], equal_nan=True), name
    assert np.isfinite(s.group["x_0"][:]).all() and np.isfinite(s.group["x_T"][:]).all()
    assert len(set(s.group["seed"][:].tolist())) == 15
    s.verify()

    held = s.heldout()
    assert held is not None and len(held) == 6
    assert held.manifest.content_hash == source.heldout().manifest.content_hash
    assert held.manifest.version == "src-store-0001-heldout"
    assert np.isnan(held.group["x_0"][0, 0])
    assert not Path(artifacts.partial_url(out)).exists()


def test_filter_stage_is_idempotent_and_content_addressed(dirty_store, tmp_path):
    src, block = dirty_store
    cfg = CFG.model_copy(update={"blocklist_uri": block})
    out = str(tmp_path / "f")
    v, counts = filt.filter_pairs(src, cfg, out)
    mtime = Path(out, "zarr.json").stat().st_mtime_ns
    assert filt.filter_pairs(src, cfg, out) == (v, counts)
    assert Path(out, "zarr.json").stat().st_mtime_ns == mtime
    # another blocklist file (same config fields) is another version
    other = tmp_path / "other.npy"
    np.save(other, BLOCK[:1] + 1.0)
    v2, c2 = filt.filter_pairs(src, cfg.model_copy(update={"blocklist_uri": str(other)}), str(tmp_path / "g"))
    assert v2 != v and c2["blocklist"] == 0
    with pytest.raises(ArtifactExists, match="immutable"):
        filt.filter_pairs(src, cfg.model_copy(update={"blocklist_uri": str(other)}), out)


def test_blocklist_shape_must_match(dirty_store, tmp_path):
    src, _ = dirty_store
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((3, 5)))
    with pytest.raises(KDMError, match=r"points of shape \(5,\), the pairs have \(2,\)"):
        filt.filter_pairs(src, FilterConfig(blocklist_uri=str(bad)), str(tmp_path / "x"))
    with pytest.raises(KDMError, match="does not exist"):
        filt.filter_pairs(src, FilterConfig(blocklist_uri=str(tmp_path / "nope.npy")), str(tmp_path / "y"))
    single = tmp_path / "single.npy"
    np.save(single, np.array([15.0, 0.0]))          # one point without the leading axis
    _, counts = filt.filter_pairs(src, FilterConfig(blocklist_uri=str(single)), str(tmp_path / "z"))
    assert counts["blocklist"] == 1


def test_duplicate_seed_keeps_the_first_surviving_row():
    from pipeline.pairs.filter import select
    from storage_schemas import FilterConfig
    data = {"x_T": np.zeros((3, 2), np.float32), "x_0": np.array([[np.nan, 0], [1, 1], [2, 2]], np.float32),
            "seed": np.array([5, 5, 6]), "label": -np.ones(3, np.int32)}
    kept, counts = select(data, FilterConfig(), None)
    assert kept.tolist() == [1, 2]
    assert counts["nonfinite"] == 1 and counts["duplicate_seed"] == 0 and counts["kept"] == 2
