"""Import of the official KDM per-pair .npz folders and GET's .pt shards; export to kdm-npz."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pipeline.pairs import importer
from pipeline.errors import ArtifactExists, KDMError
from pipeline.storage.pairstore import PairStore
from storage_schemas import PairsImportConfig, recipe_version, stable_hash

SHAPE = (3, 4, 4)


def cfg(fmt, **kw) -> PairsImportConfig:
    base = dict(format=fmt, holdout_fraction=0.0, split_seed=0, chunk_size=4)
    return PairsImportConfig(**{**base, **kw})


def pairs_data(n: int, k: int = 0, seed: int = 0):
    rng = np.random.default_rng(seed)
    x_T = 80 * rng.standard_normal((n, *SHAPE))
    x_0 = rng.uniform(-1, 1, (n, *SHAPE))
    labels = rng.integers(0, k, n) if k else np.full(n, -1)
    return x_T, x_0, labels


def write_npz_folder(folder: Path, x_T, x_0, labels, order: str, k: int = 0, traj: int = 2) -> Path:
    folder.mkdir(parents=True)
    for i in range(len(x_T)):
        mids = [x_T[i] * (1 - t) + x_0[i] * t for t in np.linspace(0, 1, traj)[1:-1]]
        path = [x_T[i], *mids, x_0[i]] if order == "xT-first" else [x_0[i], *mids[::-1], x_T[i]]
        arr = np.stack(path).astype(np.float64)
        if k:
            np.savez_compressed(folder / f"path{i}.npz", endpoints=arr, label=np.eye(k, dtype=np.float32)[labels[i]])
        else:
            np.savez_compressed(folder / f"path{i}.npz", arr)
    return folder


# --- kdm-npz -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("order,traj", [("xT-first", 2), ("x0-first", 2), ("xT-first", 5)])
def test_kdm_npz_unconditional(tmp_path, order, traj):
    x_T, x_0, _ = pairs_data(11)
    src = write_npz_folder(tmp_path / "src", x_T, x_0, None, order, traj=traj)
    out = str(tmp_path / "store")
    v = importer.import_pairs(str(src), cfg("kdm-npz", order=order), out)
    s = PairStore.open(out)
    d = s.load()
    assert np.array_equal(d["seed"], np.arange(11))                       # path0, path1, ..., path10 (natural order)
    assert np.allclose(d["x_T"], x_T) and np.allclose(d["x_0"], x_0) and np.all(d["label"] == -1)
    m = s.manifest
    assert m.origin == "import" and m.x_T_scale == 80.0 and m.num_classes == 0 and m.sample_shape == SHAPE
    assert m.import_info.format == "kdm-npz" and m.import_info.order == order and m.import_info.x_T_multiplier is None
    assert m.version == v == importer.import_version(str(src), cfg("kdm-npz", order=order))
    assert importer.import_pairs(str(src), cfg("kdm-npz", order=order), out) == v        # no-op


def test_kdm_npz_wrong_order_swaps_the_ends(tmp_path):
    x_T, x_0, _ = pairs_data(4)
    src = write_npz_folder(tmp_path / "src", x_T, x_0, None, "xT-first")
    importer.import_pairs(str(src), cfg("kdm-npz", order="x0-first"), str(tmp_path / "s"))
    d = PairStore.open(str(tmp_path / "s")).load()
    assert np.allclose(d["x_0"], x_T) and np.allclose(d["x_T"], x_0)


def test_kdm_npz_conditional_with_holdout(tmp_path):
    x_T, x_0, labels = pairs_data(20, k=10)
    src = write_npz_folder(tmp_path / "src", x_T, x_0, labels, "x0-first", k=10)
    out = str(tmp_path / "store")
    importer.import_pairs(str(src), cfg("kdm-npz", order="x0-first", holdout_fraction=0.25, split_seed=3), out)
    s = PairStore.open(out)
    held = s.heldout()
    assert len(s) == 15 and len(held) == 5 and s.manifest.num_classes == 10
    seeds = np.concatenate([s.group["seed"][:], held.group["seed"][:]])
    assert sorted(seeds.tolist()) == list(range(20))
    for store in (s, held):
        d = store.load()
        assert np.array_equal(d["label"], labels[d["seed"]])
        assert np.allclose(d["x_0"], x_0[d["seed"]]) and np.allclose(d["x_T"], x_T[d["seed"]])


def test_kdm_npz_options_and_errors(tmp_path):
    with pytest.raises(ValidationError, match="needs order: .xT-first."):
        cfg("kdm-npz")
    with pytest.raises(ValidationError, match="applies to format .kdm-npz. only"):
        cfg("get-pt", order="x0-first")
    with pytest.raises(ValidationError, match="image formats"):
        cfg("kdm-trajectories", noise_scale=80)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(KDMError, match="no .npz files"):
        importer.import_pairs(str(empty), cfg("kdm-npz", order="x0-first"), str(tmp_path / "o"))
    bad = tmp_path / "bad"
    bad.mkdir()
    np.savez(bad / "path0.npz", other=np.zeros((2, 3)))
    with pytest.raises(KDMError, match="no 'arr_0' or 'endpoints'"):
        importer.import_pairs(str(bad), cfg("kdm-npz", order="x0-first"), str(tmp_path / "o"))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    np.savez(mixed / "path0.npz", np.zeros((2, *SHAPE)))
    np.savez(mixed / "path1.npz", np.zeros((2, 3, 8, 8)))
    with pytest.raises(KDMError, match="path1.npz"):
        importer.import_pairs(str(mixed), cfg("kdm-npz", order="x0-first"), str(tmp_path / "o"))
    with pytest.raises(KDMError, match="does not exist"):
        importer.import_pairs(str(tmp_path / "nothing"), cfg("kdm-npz", order="x0-first"), str(tmp_path / "o"))


def test_trajectories_version_is_unchanged_by_the_new_options(tmp_path):
    arr = np.random.default_rng(0).standard_normal((3, 10, 2)).astype(np.float32)
    src = tmp_path / "t.npy"
    np.save(src, arr)
    c = cfg("kdm-trajectories")
    legacy = {"format": "kdm-trajectories", "holdout_fraction": 0.0, "split_seed": 0, "chunk_size": 4}
    sha = importer.artifacts.sha256_file(str(src))
    assert c.model_dump() == legacy
    v = importer.import_pairs(str(src), c, str(tmp_path / "s"))
    assert v == "import-" + stable_hash(recipe_version(), "import", sha, legacy)
    assert PairStore.open(str(tmp_path / "s")).manifest.x_T_scale == 1.0


# --- get-pt ------------------------------------------------------------------------------------------

def write_get_folder(folder: Path, eps, x_0, labels=None, k: int = 0, per_file: int = 4) -> Path:
    (folder / "latent").mkdir(parents=True)
    (folder / "image").mkdir()
    for a in range(0, len(eps), per_file):
        b = min(a + per_file, len(eps))
        name = f"{b - 1:09d}.pkl"
        lat = torch.from_numpy(eps[a:b]).float()
        if k:
            torch.save([lat, torch.eye(k)[torch.from_numpy(labels[a:b])]], folder / "latent" / name)
        else:
            torch.save(lat, folder / "latent" / name)
        torch.save(torch.from_numpy(x_0[a:b]), folder / "image" / name)      # float64, as GET's uncond images
    return folder


@pytest.mark.parametrize("k", [0, 10])
def test_get_pt_scales_the_unit_latents(tmp_path, k):
    rng = np.random.default_rng(1)
    eps = rng.standard_normal((10, *SHAPE)).astype(np.float32)
    x_0 = rng.uniform(-1, 1, (10, *SHAPE))
    labels = rng.integers(0, k, 10) if k else None
    src = write_get_folder(tmp_path / "get", eps, x_0, labels, k)
    out = str(tmp_path / "store")
    importer.import_pairs(str(src), cfg("get-pt", holdout_fraction=0.2), out)
    s, held = PairStore.open(out), PairStore.open(out).heldout()
    assert len(s) + len(held) == 10 and s.manifest.x_T_scale == 80.0 and s.manifest.num_classes == k
    assert s.manifest.import_info.x_T_multiplier == 80.0 and s.manifest.import_info.format == "get-pt"
    for store in (s, held):
        d = store.load()
        assert np.allclose(d["x_T"], 80 * eps[d["seed"]], atol=1e-5)
        assert np.allclose(d["x_0"], x_0[d["seed"]], atol=1e-6)
        assert np.array_equal(d["label"], labels[d["seed"]] if k else np.full(len(d["seed"]), -1))


def test_get_pt_custom_scale_and_layout_errors(tmp_path):
    rng = np.random.default_rng(2)
    eps = rng.standard_normal((4, *SHAPE)).astype(np.float32)
    src = write_get_folder(tmp_path / "get", eps, rng.uniform(-1, 1, (4, *SHAPE)))
    importer.import_pairs(str(src), cfg("get-pt", noise_scale=2.0), str(tmp_path / "s"))
    assert np.allclose(PairStore.open(str(tmp_path / "s")).group["x_T"][:], 2 * eps)
    (tmp_path / "nolat" / "image").mkdir(parents=True)
    with pytest.raises(KDMError, match="latent/"):
        importer.import_pairs(str(tmp_path / "nolat"), cfg("get-pt"), str(tmp_path / "o"))
    (src / "image" / "000000003.pkl").rename(src / "image" / "000000099.pkl")
    with pytest.raises(KDMError, match="pair by name"):
        importer.import_pairs(str(src), cfg("get-pt"), str(tmp_path / "o2"))


class NotATensor:
    pass


def test_get_pt_refuses_pickled_objects(tmp_path):
    folder = tmp_path / "get"
    (folder / "latent").mkdir(parents=True)
    (folder / "image").mkdir()
    torch.save({"obj": NotATensor()}, folder / "latent" / "000000001.pkl")
    torch.save(torch.zeros(2, *SHAPE), folder / "image" / "000000001.pkl")
    with pytest.raises(KDMError, match="weights_only"):
        importer.import_pairs(str(folder), cfg("get-pt"), str(tmp_path / "o"))


# --- export ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("order,k", [("x0-first", 0), ("xT-first", 0), ("x0-first", 10)])
def test_export_then_import_round_trips(tmp_path, order, k):
    x_T, x_0, labels = pairs_data(9, k=k)
    src = write_npz_folder(tmp_path / "src", x_T, x_0, labels, "x0-first", k=k)
    store = str(tmp_path / "store")
    importer.import_pairs(str(src), cfg("kdm-npz", order="x0-first", holdout_fraction=0.2), store)
    out = tmp_path / "npz"
    n = importer.export_kdm_npz(store, str(out), order=order)
    assert n == len(PairStore.open(store)) and sorted(p.name for p in out.iterdir()) == sorted(
        f"path{i}.npz" for i in range(n))
    with np.load(out / "path0.npz") as z:
        assert set(z.files) == ({"endpoints", "label"} if k else {"arr_0"})
        arr = z["endpoints"] if k else z["arr_0"]
        assert arr.dtype == np.float32 and arr.shape == (2, *SHAPE)
    back = str(tmp_path / "back")
    importer.import_pairs(str(out), cfg("kdm-npz", order=order), back)
    a, b = PairStore.open(store).load(), PairStore.open(back).load()
    for name in ("x_T", "x_0", "label"):
        assert np.array_equal(a[name], b[name]), name
    held_out = tmp_path / "held"
    assert importer.export_kdm_npz(store, str(held_out), order=order, split="heldout") == 2
    with pytest.raises(ArtifactExists):
        importer.export_kdm_npz(store, str(out), order=order)
