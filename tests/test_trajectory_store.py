"""Trajectory pair stores: snapshots of the teacher's trajectories (array x_t) written by import and
generate, carried by the filter, verified on every read; stores without them keep working (CPU-sized)."""
import json
import shutil

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from models.samplers import edm_heun, edm_levels, integrate_ode
from pipeline.errors import DataCorrupt, KDMError
from pipeline.pairs import filter as filt
from pipeline.pairs import importer
from pipeline.pairs.generate import generate_pairs
from pipeline.storage.pairstore import PairStore
from storage_schemas import (FilterConfig, PairsGenerateConfig, PairsImportConfig, PairStoreManifest, SamplerSettings,
                             SeedRange, Snapshots)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def traj(tmp_path_factory):
    """float32 (T=5, N=300, D=2) trajectories, distinct per entry; returns (path, array)."""
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(5, 300, 2)).astype(np.float32) + np.arange(5, dtype=np.float32)[:, None, None]
    path = tmp_path_factory.mktemp("src") / "traj.npy"
    np.save(path, arr)
    return str(path), arr


def do_import(src, out, snapshots=None, chunk=64):
    cfg = PairsImportConfig(holdout_fraction=0.2, split_seed=0, chunk_size=chunk, snapshots=snapshots)
    return importer.import_pairs(src, cfg, str(out))


# --- import ------------------------------------------------------------------------------------------

def test_import_keeps_the_snapshots_round_trip(traj, tmp_path):
    src, arr = traj
    v = do_import(src, tmp_path / "s", snapshots="all")
    store = PairStore.open(str(tmp_path / "s"))
    m = store.manifest
    assert m.schema_version == 2 and store.pair_arrays == ("x_T", "x_0", "label", "seed", "x_t")
    assert m.snapshots == Snapshots(count=3, axis="flow-matching-time", x_T_level=0.0, levels=(0.25, 0.5, 0.75),
                                    source_index=(1, 2, 3))
    assert m.arrays["x_t"].shape == (240, 3, 2) and m.arrays["x_t"].chunks == (64, 3, 2)
    for split in (store, store.heldout()):
        d = split.load(split.pair_arrays)
        idx = d["seed"]
        assert d["x_t"].dtype == np.float32
        assert np.array_equal(d["x_t"], arr[1:4][:, idx].transpose(1, 0, 2))      # (N, K, D), sampling order
        assert np.array_equal(d["x_T"], arr[0][idx]) and np.array_equal(d["x_0"], arr[-1][idx])
    assert store.verify() == 5 * 4 + 5 * 1                  # 5 arrays x 4 (train) / 1 (held out) chunks
    assert "x_t (float32, (N, 3, *sample_shape)" in store.group.attrs["description"]
    # the snapshots enter the version: the same file without them is another store
    assert do_import(src, tmp_path / "p") != v
    sub = do_import(src, tmp_path / "sub", snapshots=(2,))
    sm = PairStore.open(str(tmp_path / "sub")).manifest
    assert sub not in (v,) and sm.snapshots.levels == (0.5,) and sm.snapshots.source_index == (2,)


def test_a_store_without_snapshots_is_what_it_was(traj, tmp_path):
    src, _ = traj
    cfg = PairsImportConfig(holdout_fraction=0.2, split_seed=0, chunk_size=64)
    assert "snapshots" not in cfg.model_dump()                     # versions of older imports stay the same
    do_import(src, tmp_path / "p")
    store = PairStore.open(str(tmp_path / "p"))
    raw = json.loads((tmp_path / "p" / "zarr.json").read_text())["attributes"]["kdm"]
    assert raw["schema_version"] == 1 and "snapshots" not in raw and "x_t" not in raw["arrays"]
    assert store.manifest.snapshots is None and store.pair_arrays == ("x_T", "x_0", "label", "seed")
    assert store.verify() == 4 * 4 + 4 * 1


def test_a_missing_snapshot_chunk_is_an_error_not_zeros(traj, tmp_path):
    src, _ = traj
    do_import(src, tmp_path / "s", snapshots="all")
    shutil.rmtree(tmp_path / "s" / "x_t" / "c" / "2")           # chunk 2 of x_t (rows 128-191)
    store = PairStore.open(str(tmp_path / "s"))
    with pytest.raises(DataCorrupt, match=r"array 'x_t', chunk 2 \(rows 128-191.*is missing"):
        store.read("x_t", 130, 140)
    with pytest.raises(DataCorrupt, match="x_t"):
        store.verify()
    with pytest.raises(DataCorrupt, match="x_t"):
        store.load_all()


def test_import_snapshot_options_are_checked(traj, tmp_path):
    src, _ = traj
    with pytest.raises(KDMError, match=r"indices in \[1, 3\]"):
        do_import(src, tmp_path / "x", snapshots=(4,))
    for bad in ((), (2, 1), (0, 2)):
        with pytest.raises(ValidationError, match="snapshots"):
            PairsImportConfig(snapshots=bad)
    with pytest.raises(ValidationError, match="kdm-trajectories"):
        PairsImportConfig(format="npz", snapshots="all")


def test_manifest_snapshot_checks():
    base = dict(count=2, axis="flow-matching-time", x_T_level=0.0)
    Snapshots(**base, levels=(0.3, 0.6))
    with pytest.raises(ValidationError, match="strictly"):
        Snapshots(**base, levels=(0.6, 0.3))                 # not in sampling order
    with pytest.raises(ValidationError, match="strictly"):
        Snapshots(**base, levels=(0.3, 1.0))                 # x_0's own level is not a snapshot
    with pytest.raises(ValidationError, match="2 levels for count 3"):
        Snapshots(**{**base, "count": 3}, levels=(0.3, 0.6))
    Snapshots(count=1, axis="edm-sigma", x_T_level=80.0, levels=(2.5,))
    with pytest.raises(ValidationError, match="strictly"):
        Snapshots(count=1, axis="edm-sigma", x_T_level=80.0, levels=(90.0,))


def test_manifest_and_arrays_must_agree(traj, tmp_path):
    src, _ = traj
    do_import(src, tmp_path / "s", snapshots="all")
    raw = json.loads((tmp_path / "s" / "zarr.json").read_text())["attributes"]["kdm"]
    no_snap = {k: v for k, v in raw.items() if k != "snapshots"}
    with pytest.raises(ValidationError, match="x_t is present but the manifest records no snapshots"):
        PairStoreManifest.model_validate(no_snap)
    with pytest.raises(ValidationError, match="schema_version >= 2"):
        PairStoreManifest.model_validate({**raw, "schema_version": 1})
    with pytest.raises(ValidationError, match="newer than this kdm reads"):
        PairStoreManifest.model_validate({**raw, "schema_version": 3})
    with pytest.raises(ValidationError, match=r"x_t.shape .* != \(count, K, \*sample_shape\)"):
        PairStoreManifest.model_validate({**raw, "snapshots": {**raw["snapshots"], "count": 2,
                                                               "levels": [0.25, 0.5], "source_index": [1, 2]}})


def test_filter_carries_the_snapshots_of_the_kept_pairs(traj, tmp_path):
    src, arr = traj
    do_import(src, tmp_path / "s", snapshots="all")
    bad = np.array([arr[-1][5], arr[-1][5]])                     # a blocklisted x_0: its pair goes
    np.save(tmp_path / "block.npy", bad)
    _, counts = filt.filter_pairs(str(tmp_path / "s"), FilterConfig(blocklist_uri=str(tmp_path / "block.npy"),
                                                                     blocklist_radius=1e-6), str(tmp_path / "f"))
    out = PairStore.open(str(tmp_path / "f"))
    src_store = PairStore.open(str(tmp_path / "s"))
    assert counts["blocklist"] == (5 in src_store.load(["seed"])["seed"])
    assert out.manifest.snapshots == src_store.manifest.snapshots and out.manifest.schema_version == 2
    d, s = out.load(out.pair_arrays + ("source_index",)), src_store.load(src_store.pair_arrays)
    assert np.array_equal(d["x_t"], s["x_t"][d["source_index"]])
    held = out.heldout()
    assert np.array_equal(held.load(["x_t"])["x_t"], src_store.heldout().load(["x_t"])["x_t"])
    assert out.verify() > 0


def test_filter_drops_pairs_with_a_nonfinite_snapshot():
    n = 6
    data = {"x_T": np.zeros((n, 2), np.float32), "x_0": np.arange(2 * n, dtype=np.float32).reshape(n, 2),
            "seed": np.arange(n), "x_t": np.zeros((n, 3, 2), np.float32)}
    data["x_t"][4, 1, 0] = np.nan
    kept, counts = filt.select(data, FilterConfig(), None)
    assert counts["nonfinite"] == 1 and list(kept) == [0, 1, 2, 3, 5]


# --- samplers and generation -------------------------------------------------------------------------

def test_ode_solver_keeps_the_states_of_its_own_steps():
    v = lambda x, t: torch.sin(3 * x) + t[:, None]                 # noqa: E731
    x = torch.randn(7, 2, generator=torch.Generator().manual_seed(0))
    for method in ("euler", "midpoint", "heun"):
        end, kept = integrate_ode(v, x, 6, method, keep=(2, 3, 5))
        assert torch.equal(end, integrate_ode(v, x, 6, method))     # keeping states changes nothing
        assert kept.shape == (7, 3, 2)
        for j, k in enumerate((2, 3, 5)):                           # the state after k of the 6 steps
            assert torch.allclose(kept[:, j], integrate_ode(v, x, k, method, t1=k / 6), atol=1e-6)
    with pytest.raises(ValueError, match="increasing step numbers"):
        integrate_ode(v, x, 6, keep=(6,))


class ToyDenoiser(torch.nn.Module):
    sigma_min, sigma_max, label_dim = 0.0, float("inf"), 0

    def forward(self, x, sigma, class_labels=None):
        return torch.tanh(x) / (1 + torch.as_tensor(sigma, dtype=x.dtype))

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


def test_edm_heun_keeps_its_states_at_the_edm_levels():
    net = ToyDenoiser()
    x_T = 80 * torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    end, kept = edm_heun(net, x_T, num_steps=6, keep=(2, 4))
    assert torch.equal(end, edm_heun(net, x_T, num_steps=6)) and kept.shape == (3, 2, 3, 4, 4)
    levels = edm_levels(net, 6)
    assert len(levels) == 7 and levels[0] == 80.0 and levels[-1] == 0.0
    # the state after k steps is where EDM's loop is at noise level t_k: run the loop by hand
    t = torch.tensor(levels, dtype=torch.float64)
    x = x_T
    for i in range(4):
        d = (x - net(x, t[i])) / t[i]
        x1 = x + (t[i + 1] - t[i]) * d
        x = x + (t[i + 1] - t[i]) * (0.5 * d + 0.5 * (x1 - net(x1, t[i + 1])) / t[i + 1])
        if i + 1 in (2, 4):
            assert torch.allclose(kept[:, (2, 4).index(i + 1)], x, rtol=1e-12, atol=1e-12)


def test_sampler_settings_snapshot_steps_and_cut_short():
    s = SamplerSettings(steps=10, snapshot_steps=(3, 6))
    assert s.model_dump()["snapshot_steps"] == (3, 6) and "snapshot_steps" not in SamplerSettings().model_dump()
    with pytest.raises(ValidationError, match="snapshot_steps"):
        SamplerSettings(steps=10, snapshot_steps=(10,))
    assert SamplerSettings.even_snapshots(18, 3) == (5, 9, 14) and SamplerSettings.even_snapshots(20, 1) == (10,)
    edm = SamplerSettings(kind="edm-heun", snapshot_steps=(5, 9, 14))
    assert [edm.at_nfe(n).steps for n in (3, 5, 9, 17, 35)] == [2, 3, 5, 9, 18]
    assert edm.at_nfe(3).snapshot_steps is None and edm.at_nfe(35).nfe == 35
    with pytest.raises(ValueError, match="odd NFE"):
        edm.at_nfe(4)
    mid = SamplerSettings()                                          # midpoint, 20 steps (40 NFE)
    assert [(mid.at_nfe(n).method, mid.at_nfe(n).steps) for n in (1, 2, 4, 40)] == \
        [("euler", 1), ("midpoint", 1), ("midpoint", 2), ("midpoint", 20)]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from pipeline import presets
    from pipeline.teachers.flow_matching import train_teacher
    out = tmp_path_factory.mktemp("t") / "teacher"
    train_teacher(presets.load("teacher", "smoke", sets=["steps=20"]), str(out), progress=False)
    return str(out)


def test_generate_keeps_snapshots_of_the_teacher_ode(teacher, tmp_path):
    from pipeline.teachers.flow_matching import load_teacher
    cfg = PairsGenerateConfig(seeds=SeedRange(start=0, stop=120), heldout_seeds=SeedRange(start=120, stop=160),
                              sampler=SamplerSettings(method="euler", steps=8, snapshot_steps=(2, 4, 6)), chunk_size=50)
    generate_pairs(teacher, cfg, str(tmp_path / "g"), progress=False)
    store = PairStore.open(str(tmp_path / "g"))
    m = store.manifest
    assert m.snapshots.levels == (0.25, 0.5, 0.75) and m.snapshots.solver_steps == (2, 4, 6)
    assert m.sampler.snapshot_steps == (2, 4, 6) and m.schema_version == 2
    d = store.load(store.pair_arrays)
    velocity, _ = load_teacher(teacher)
    end, kept = integrate_ode(velocity, torch.from_numpy(d["x_T"]), 8, "euler", keep=(2, 4, 6))
    assert np.allclose(d["x_0"], end.numpy(), atol=1e-6) and np.allclose(d["x_t"], kept.numpy(), atol=1e-6)
    assert store.verify() == 3 * 5 + 1 * 5                           # train: 3 chunks, held out: 1, of 5 arrays
    # the same seeds without snapshots: the same pairs, another version
    plain = cfg.model_copy(update={"sampler": SamplerSettings(method="euler", steps=8)})
    generate_pairs(teacher, plain, str(tmp_path / "p"), progress=False)
    p = PairStore.open(str(tmp_path / "p"))
    assert p.version != store.version and p.manifest.snapshots is None
    assert np.array_equal(p.load(["x_0"])["x_0"], d["x_0"])
