"""Image privacy filter and dedup (pipeline.pairs.filter_images) on a tiny planted store of 32x32 images."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from image_fixtures import png_bytes, write_archive
from storage_schemas import ImportInfo
from storage_schemas.filter_images import ImageFilterConfig

from pipeline.data.datasets import open_image_dataset, prepare_image_dataset
from pipeline.errors import ArtifactExists, KDMError
from pipeline.pairs import filter_images as fi
from pipeline.storage import artifacts, pairstore
from pipeline.storage.pairstore import PairStore

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32
N_NATURAL = 60
CFG = ImageFilterConfig(chunk_size=1000, calibration_samples=30, grid_size=16)


def smooth_images(rng: np.random.Generator, n: int) -> np.ndarray:
    """Natural-ish uint8 images (n, 3, 32, 32): bilinear-upsampled 4x4 random fields plus a little noise."""
    import torch
    import torch.nn.functional as F
    low = torch.as_tensor(rng.uniform(0, 255, (n, 3, 4, 4)), dtype=torch.float32)
    up = F.interpolate(low, size=(SIZE, SIZE), mode="bilinear", align_corners=False).numpy()
    up += rng.normal(0, 4, up.shape)
    return np.clip(up, 0, 255).round().astype(np.uint8)


def shift(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """img moved by (dy, dx) pixels, the border filled by repeating the edge."""
    p = max(abs(dy), abs(dx))
    padded = np.pad(img, ((0, 0), (p, p), (p, p)), mode="edge")
    return padded[:, p - dy:p - dy + SIZE, p - dx:p - dx + SIZE]


def to_x0(img_u8: np.ndarray) -> np.ndarray:
    return img_u8.astype(np.float32) / 127.5 - 1.0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fimg")
    rng = np.random.default_rng(0)
    train, test = smooth_images(rng, 150), smooth_images(rng, 30)
    members = {}
    for split, imgs in (("train", train), ("test", test)):
        for i, img in enumerate(imgs):
            members[f"{split}/c{i % 3}/{i:04d}.png"] = png_bytes(img.transpose(1, 2, 0))
    ds_url = str(tmp / "ds")
    prepare_image_dataset(str(write_archive(tmp / "ds.tar.gz", members)), ds_url, chunk_size=64, progress=False)
    train_u8, _ = open_image_dataset(ds_url).load("train")

    natural = smooth_images(rng, N_NATURAL + 1)
    blocked = natural[-1]
    np.save(tmp / "block.npy", blocked[None])
    x0 = [to_x0(im) for im in natural[:N_NATURAL]]
    xT = [rng.standard_normal((3, SIZE, SIZE)).astype(np.float32) for _ in range(N_NATURAL)]
    seeds = list(range(N_NATURAL))
    expect: dict[int, str] = {}

    def plant(img_x0: np.ndarray, reason: str | None, seed: int | None = None, x_T: np.ndarray | None = None):
        x0.append(img_x0.astype(np.float32))
        xT.append(rng.standard_normal((3, SIZE, SIZE)).astype(np.float32) if x_T is None else x_T)
        seeds.append(1000 + len(seeds) if seed is None else seed)
        if reason:
            expect[len(x0) - 1] = reason

    plant(to_x0(train_u8[3]), "memorised")                             # identity copy
    plant(to_x0(train_u8[5][:, :, ::-1]), "memorised")                 # horizontal flip
    plant(to_x0(shift(train_u8[7], 2, -2)), "memorised")               # 2-px shift
    plant(to_x0(shift(train_u8[9][:, :, ::-1], -1, 2)), "memorised")   # flip + shift
    plant(x0[4].copy(), "exact_duplicate", x_T=xT[4].copy())           # identical x_0 and x_T
    plant(x0[6].copy(), "exact_duplicate")                              # identical x_0 bytes
    plant(x0[8] + rng.normal(0, 0.01, x0[8].shape), "near_duplicate")  # near copy of a kept pair
    plant(to_x0(shift(natural[10], 1, 1)), "near_duplicate")             # shifted copy of a kept pair
    nan = x0[12].copy() + 0.05
    nan[0, 3, 3] = np.nan
    plant(nan, "nonfinite")
    plant(x0[14][:, ::-1].copy() * 0.5, "duplicate_seed", seed=2)       # seed 2 seen at row 2
    plant(to_x0(shift(blocked, 0, 1)), "blocklist")                      # the blocklisted image, moved 1 px
    data = {"x_0": np.stack(x0), "x_T": np.stack(xT), "label": np.full(len(x0), -1, np.int32),
            "seed": np.array(seeds, np.int64)}
    src = write_store(str(tmp / "pairs"), data, chunk=16)
    return {"tmp": tmp, "ds": ds_url, "pairs": src, "block": str(tmp / "block.npy"), "expect": expect,
            "data": data, "train": train_u8}


def write_store(url: str, data: dict, chunk: int) -> str:
    info = ImportInfo(format="kdm-trajectories", source_uri="test://src", source_sha256="0" * 64,
                      holdout_fraction=0.1, split_seed=0)
    common = dict(origin="import", chunk_size=chunk, import_info=info, code_version="test", created="now")
    root = pairstore.create_arrays(url, len(data["seed"]), data["x_0"].shape[1:], chunk)
    pairstore.write_region(root, 0, data)
    held = {k: v[:5].copy() for k, v in data.items()}
    held["x_0"][0, 0, 0, 0] = np.nan            # held-out data is copied unchanged, never filtered
    child = pairstore.create_arrays(artifacts.join(url, "heldout"), 5, data["x_0"].shape[1:], chunk)
    pairstore.write_region(child, 0, held)
    pairstore.finalize(child, version="img-src-0001-heldout", split="heldout", **common)
    pairstore.finalize(root, version="img-src-0001", split="train", **common)
    return url


def run(world, name: str, cfg: ImageFilterConfig = CFG, **kw) -> tuple[dict, str]:
    out = str(world["tmp"] / name)
    cfg = cfg.model_copy(update={"blocklist_uri": world["block"]}) if "blocklist_uri" not in kw else cfg
    kw.pop("blocklist_uri", None)
    return fi.filter_image_pairs(world["pairs"], cfg, out, dataset_uri=world["ds"], **kw), out


def dropped_by_reason(out: str) -> dict[int, str]:
    report = json.loads(Path(out, fi.REPORT_FILE).read_text())
    return {d["source_index"]: d["reason"] for d in report["dropped"]}


def test_planted_copies_are_dropped_with_their_reason(world):
    res, out = run(world, "f")
    expect = world["expect"]
    counts = {k: res[k] for k in ("kept", *fi.REASONS)}
    assert list(counts) == ["kept", "nonfinite", "duplicate_seed", "exact_duplicate", "memorised", "blocklist",
                            "near_duplicate"]
    n = len(world["data"]["seed"])
    want = {r: sum(1 for v in expect.values() if v == r) for r in fi.REASONS}
    assert counts == {"kept": n - len(expect), **want}
    assert dropped_by_reason(out) == expect

    s = PairStore.open(out)
    m = s.manifest
    assert m.origin == "filter" and m.count == n - len(expect) and m.filter.counts == counts
    assert m.filter.source_version == "img-src-0001" and m.version == res["version"]
    keep = [i for i in range(n) if i not in expect]
    assert s.group["source_index"][:].tolist() == keep
    for name in ("x_T", "x_0", "label", "seed"):
        assert np.array_equal(s.group[name][:], world["data"][name][keep]), name
    s.verify()
    held = s.heldout()
    assert held is not None and len(held) == 5 and np.isnan(held.group["x_0"][0, 0, 0, 0])
    assert not Path(artifacts.partial_url(out)).exists()

    report = fi.read_filter_report(out)
    assert report["counts"] == counts and report["thresholds"]["rule"] == "carlini"
    assert report["calibration"]["test_images"] == 30 and report["calibration"]["test_flagged"] == 0
    assert sum(report["histogram"]["generated"]) == n - 4       # every pair that reached the training search
    assert sum(report["histogram"]["test"]) == 30
    full = json.loads(Path(out, fi.REPORT_FILE).read_text())
    mem = {d["source_index"]: d for d in full["dropped"] if d["reason"] == "memorised"}
    first = min(mem)
    assert mem[first]["nearest_index"] == 3 and mem[first]["distance"] < 1e-3
    assert mem[first + 1]["flip"] is True and mem[first + 2]["shift"] == [2, -2]
    assert mem[first + 3]["flip"] is True
    assert [g["distance"] for g in report["grid"]] == sorted(g["distance"] for g in report["grid"])
    assert report["grid"][0]["distance"] < 1e-3 and len(report["grid"]) == 16
    assert Path(out, fi.GRID_FILE).stat().st_size > 0
    assert "memorised" in fi.report_markdown(report)


def test_streaming_and_exhaustive_search_give_the_same_result(world):
    ref, out1 = run(world, "one")
    small, out2 = run(world, "small", CFG.model_copy(update={"chunk_size": 7}))
    exact, out3 = run(world, "exact", CFG.model_copy(update={"candidates": 0}))
    assert small["version"] == ref["version"]                   # chunk size is not part of the version
    assert exact["version"] != ref["version"]
    for res, out in ((small, out2), (exact, out3)):
        assert {k: res[k] for k in ("kept", *fi.REASONS)} == {k: ref[k] for k in ("kept", *fi.REASONS)}
        assert dropped_by_reason(out) == dropped_by_reason(out1)
        assert np.array_equal(PairStore.open(out).group["source_index"][:],
                              PairStore.open(out1).group["source_index"][:])


@pytest.mark.parametrize("update", [{"rule": "gu"}, {"rule": "absolute", "absolute_threshold": 0.02},
                                    {"normalise": "mean-std"}])
def test_other_rules_find_the_same_copies(world, update):
    res, out = run(world, "rule-" + "-".join(str(v) for v in update.values()), CFG.model_copy(update=update))
    assert dropped_by_reason(out) == world["expect"]


def test_version_follows_thresholds_and_rerun_is_a_noop(world):
    res, out = run(world, "v")
    mtime = Path(out, "zarr.json").stat().st_mtime_ns
    again, _ = run(world, "v")
    assert again["noop"] and again["version"] == res["version"] and again["kept"] == res["kept"]
    assert Path(out, "zarr.json").stat().st_mtime_ns == mtime
    cfg = CFG.model_copy(update={"blocklist_uri": world["block"]})
    ds_version = open_image_dataset(world["ds"]).version       # what the flow names the output by
    assert res["version"] == fi.image_filter_version("img-src-0001", cfg, ds_version,
                                                     fi.blocklist_digest(world["block"]))
    v = fi.image_filter_version("img-src-0001", CFG, "h", None)
    assert v.startswith("filtered-")
    for update in ({"ratio_threshold": 0.25}, {"max_shift": 1}, {"flip": False}, {"neighbours": 40},
                   {"rule": "gu"}, {"normalise": "none"}, {"absolute_quantile": 0.01}):
        assert fi.image_filter_version("img-src-0001", CFG.model_copy(update=update), "h", None) != v, update
    assert fi.image_filter_version("img-src-0001", CFG.model_copy(update={"device": "cuda", "chunk_size": 3}),
                                   "h", None) == v
    assert fi.image_filter_version("img-src-0001", CFG, "other", None) != v
    assert fi.image_filter_version("img-src-0001", CFG, "h", "0" * 64) != v
    with pytest.raises(ArtifactExists, match="immutable"):
        run(world, "v", CFG.model_copy(update={"ratio_threshold": 0.2}))


def test_bad_inputs_name_the_setting(world, tmp_path):
    for bad in ({"ratio_threshold": 1.5}, {"ratio_threshold": 0}, {"absolute_threshold": -1},
                {"candidates": 10}, {"max_shift": -1}):
        with pytest.raises(ValidationError, match=next(iter(bad)) if "candidates" not in bad else "candidates"):
            ImageFilterConfig(**bad)
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((2, 3, 16, 16), np.uint8))
    out = str(tmp_path / "o")
    with pytest.raises(KDMError, match=r"blocklist_uri .* shape \(3, 16, 16\)"):
        fi.filter_image_pairs(world["pairs"], CFG.model_copy(update={"blocklist_uri": str(wrong)}), out,
                              dataset_uri=world["ds"])
    with pytest.raises(KDMError, match="blocklist_uri .* does not exist"):
        fi.filter_image_pairs(world["pairs"], CFG.model_copy(update={"blocklist_uri": str(tmp_path / "no.npy")}),
                              out, dataset_uri=world["ds"])
    with pytest.raises(KDMError, match="needs the teacher's dataset"):
        fi.filter_image_pairs(world["pairs"], CFG, out)
    # a dataset of another resolution
    rng = np.random.default_rng(1)
    members = {f"{s}/a/{i}.png": png_bytes(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
               for s in ("train", "test") for i in range(3)}
    small = str(tmp_path / "ds8")
    prepare_image_dataset(str(write_archive(tmp_path / "d8.tar.gz", members)), small, progress=False)
    with pytest.raises(KDMError, match=r"dataset .* shape \(3, 8, 8\)"):
        fi.filter_image_pairs(world["pairs"], CFG, out, dataset_uri=small)
    assert not Path(out).exists() and not Path(artifacts.partial_url(out)).exists()


def test_blocklist_folder_of_images(world, tmp_path):
    folder = tmp_path / "blockdir"
    folder.mkdir()
    img = np.load(world["block"])[0]
    (folder / "a.png").write_bytes(png_bytes(img.transpose(1, 2, 0)))
    res, out = run(world, "bdir", CFG.model_copy(update={"blocklist_uri": str(folder)}), blocklist_uri=True)
    assert dropped_by_reason(out) == world["expect"]
    assert res["version"] != run(world, "f2")[0]["version"]


def test_cli_filters_an_image_store(world, capsys):
    from pipeline.cli import main
    out = str(world["tmp"] / "cli")
    code = main(["pairs", "filter", "--pairs", world["pairs"], "--dataset", world["ds"], "--blocklist", world["block"],
                 "--calibration-samples", "30", "--out", out, "-q"])
    text = capsys.readouterr().out
    assert code in (0, None), text
    assert "memorised=4" in text and "blocklist=1" in text and "near_duplicate=2" in text
    assert dropped_by_reason(out) == world["expect"]
    assert PairStore.open(out).group["source_index"].shape[0] == len(world["data"]["seed"]) - len(world["expect"])
    assert main(["pairs", "filter", "--pairs", world["pairs"], "--near-duplicate-radius", "0.1", "--dataset",
                 world["ds"], "--out", str(world["tmp"] / "cli2")]) != 0
    assert "2-D filter" in capsys.readouterr().err
    assert main(["pairs", "filter", "--pairs", world["pairs"], "--ratio-threshold", "2", "--dataset", world["ds"],
                 "--out", str(world["tmp"] / "cli3")]) != 0
    assert "ratio_threshold" in capsys.readouterr().err


def test_cli_keeps_the_2d_filter(tmp_path, capsys):
    from pipeline.cli import main
    info = ImportInfo(format="kdm-trajectories", source_uri="test://src", source_sha256="0" * 64,
                      holdout_fraction=0.1, split_seed=0)
    pts = np.array([[0, 0], [0, 0.0001], [5, 5], [np.nan, 1]], np.float32)
    data = {"x_0": pts, "x_T": np.arange(8, dtype=np.float32).reshape(4, 2), "label": np.full(4, -1, np.int32),
            "seed": np.arange(4, dtype=np.int64)}
    url = str(tmp_path / "p2")
    root = pairstore.create_arrays(url, 4, (2,), 4)
    pairstore.write_region(root, 0, data)
    pairstore.finalize(root, version="twod-0001", split="train", origin="import", chunk_size=4, import_info=info,
                       code_version="test", created="now")
    assert main(["pairs", "filter", "--pairs", url, "--near-duplicate-radius", "0.001", "--out",
                 str(tmp_path / "o")]) in (0, None)
    assert "kept 2" in capsys.readouterr().out
    assert main(["pairs", "filter", "--pairs", url, "--dataset", "x", "--out", str(tmp_path / "o2")]) != 0
    assert "--dataset" in capsys.readouterr().err


def test_memorisation_can_be_reported_without_dropping(world):
    res, out = run(world, "keepmem", CFG.model_copy(update={"memorisation": False}))
    expect = {i: r for i, r in world["expect"].items() if r != "memorised"}
    assert res["memorised"] == 0 and dropped_by_reason(out) == expect
    report = fi.read_filter_report(out)
    assert not report["memorisation_tested"] and report["grid"][0]["distance"] < 1e-3


def test_ratio_without_a_second_neighbour_is_not_a_copy():
    nb = fi.Neighbourhood(d1=np.array([0.1, 0.0, 0.1]), d2=np.array([np.inf, np.inf, 0.5]),
                          meank=np.array([np.inf, 0.2, 0.3]), ref=np.zeros(3, np.int64), variant=np.zeros(3, np.int64))
    assert nb.ratio("gu").tolist() == [1.0, 0.0, 0.2]
    assert nb.ratio("carlini")[0] == 1.0 and nb.ratio("carlini")[1] == 0.0


def test_a_damaged_source_store_is_refused_and_nothing_is_written(world, tmp_path):
    """The filter reads through the pair store's checked path: a deleted chunk of x_0 is an error that
    names the array and the chunk, never a pair of zeros that passes the filter."""
    import shutil
    from pipeline.errors import KDMError
    src = tmp_path / "pairs"
    shutil.copytree(world["pairs"], src)
    chunk = src / "x_0" / "c" / "1" / "0" / "0" / "0"
    assert chunk.is_file()
    chunk.unlink()
    out = tmp_path / "filtered"
    with pytest.raises(KDMError, match=r"array 'x_0', chunk 1 .*missing"):
        fi.filter_image_pairs(str(src), CFG, str(out), dataset_uri=world["ds"])
    assert not out.exists()


def test_reads_run_one_chunk_ahead_in_order_and_errors_surface():
    import threading
    from pipeline.pairs.filter_images import _ahead
    seen, second = [], threading.Event()

    def read(a):
        seen.append((a, threading.current_thread() is threading.main_thread()))
        if a == 10:
            second.set()
        if a == 30:
            raise ValueError("chunk 30 is damaged")
        return a * 2

    it = _ahead(range(0, 50, 10), read)
    assert next(it) == (0, 0)
    assert second.wait(10)                          # the next chunk is read while the caller works on this one
    assert [a for a, _ in seen] == [0, 10]
    assert not any(main for _, main in seen)        # ... in a thread
    assert next(it) == (10, 20) and next(it) == (20, 40)
    with pytest.raises(ValueError, match="chunk 30 is damaged"):
        next(it)
    assert list(_ahead(range(0), read)) == []
