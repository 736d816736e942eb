"""Teacher pair generation and the Zarr pair-store format: determinism, immutability, resumability."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from models.samplers import integrate_ode, seeded_noise
from pipeline.storage import artifacts
from pipeline.pairs import generate
from pipeline.storage import pairstore
from pipeline import presets
from pipeline.teachers import flow_matching as teacher
from pipeline.errors import ArtifactExists, ArtifactMissing, KDMError
from pipeline.storage.pairstore import PairStore
from storage_schemas import PairsGenerateConfig, PairStoreManifest, SamplerSettings, SeedRange
from store_checks import assert_same_store

TRAIN, HELD, CHUNK = (0, 600), (600, 700), 200   # 3 train shards, 1 held-out shard


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("teacher") / "teacher")
    teacher.train_teacher(presets.load("teacher", "smoke"), out, progress=False)
    return out


def make_cfg(train=TRAIN, held=HELD, chunk=CHUNK, steps=3, method="euler") -> PairsGenerateConfig:
    return PairsGenerateConfig(seeds=SeedRange(start=train[0], stop=train[1]),
                               heldout_seeds=SeedRange(start=held[0], stop=held[1]) if held else None,
                               sampler=SamplerSettings(method=method, steps=steps), chunk_size=chunk)


@pytest.fixture(scope="module")
def reference(teacher_dir, tmp_path_factory):
    """One uninterrupted run of the default config."""
    out = str(tmp_path_factory.mktemp("ref") / "pairs")
    version = generate.generate_pairs(teacher_dir, make_cfg(), out, progress=False)
    return out, version


# --- determinism -------------------------------------------------------------------------------------

def test_same_config_into_two_dirs_is_byte_identical(teacher_dir, reference, tmp_path):
    ref_out, ref_version = reference
    other = str(tmp_path / "again")
    assert generate.generate_pairs(teacher_dir, make_cfg(), other, progress=False) == ref_version
    assert_same_store(ref_out, other)


def test_different_seeds_give_a_different_version_and_hash(teacher_dir, reference, tmp_path):
    ref_out, ref_version = reference
    out = str(tmp_path / "shifted")
    v = generate.generate_pairs(teacher_dir, make_cfg(train=(1, 601), held=(601, 701)), out, progress=False)
    assert v != ref_version
    assert PairStore.open(out).manifest.content_hash != PairStore.open(ref_out).manifest.content_hash


def test_device_does_not_enter_the_version():
    cfg = make_cfg()
    assert generate.pairs_version("t", cfg) == generate.pairs_version("t", cfg.model_copy(update={"device": "cuda"}))
    assert generate.pairs_version("t", cfg) != generate.pairs_version("u", cfg)
    assert generate.pairs_version("t", cfg) != generate.pairs_version("t", make_cfg(steps=4))


def test_a_pair_depends_only_on_its_seed(teacher_dir, reference, tmp_path):
    """Re-chunking and a sub-range give the same pairs for the same seeds."""
    ref = PairStore.open(reference[0]).load()
    out = str(tmp_path / "sub")
    generate.generate_pairs(teacher_dir, make_cfg(train=(150, 450), held=None, chunk=70), out, progress=False)
    sub = PairStore.open(out).load()
    assert np.array_equal(sub["seed"], np.arange(150, 450))
    assert np.array_equal(sub["x_T"], ref["x_T"][150:450])
    assert np.allclose(sub["x_0"], ref["x_0"][150:450], atol=1e-6)


def test_pairs_are_teacher_ode_solutions_of_seeded_noise(teacher_dir, reference):
    s = PairStore.open(reference[0])
    d = s.load()
    seeds = list(range(*TRAIN))
    assert np.array_equal(d["x_T"], seeded_noise(seeds, (2,)).numpy())
    model, _ = teacher.load_teacher(teacher_dir)
    x0 = integrate_ode(model, torch.from_numpy(d["x_T"]), 3, "euler").numpy()
    assert np.allclose(d["x_0"], x0, atol=1e-5)
    assert not np.allclose(d["x_0"], d["x_T"])


# --- idempotence and immutability --------------------------------------------------------------------

def test_second_generate_into_the_same_out_is_a_no_op(teacher_dir, reference):
    out, version = reference
    meta = Path(out) / "zarr.json"
    before = os.stat(meta).st_mtime_ns
    calls = []
    assert generate.generate_pairs(teacher_dir, make_cfg(), out, progress=False,
                                   on_shard=lambda i, n: calls.append(i)) == version
    assert os.stat(meta).st_mtime_ns == before
    assert calls == []


def test_another_version_into_an_existing_store_is_refused(teacher_dir, reference):
    out, version = reference
    with pytest.raises(ArtifactExists) as e:
        generate.generate_pairs(teacher_dir, make_cfg(steps=5), out, progress=False)
    msg = str(e.value)
    assert "artifacts are immutable" in msg and version in msg
    assert PairStore.open(out).version == version   # untouched


def test_a_non_kdm_directory_is_not_overwritten(teacher_dir, tmp_path):
    out = tmp_path / "occupied"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactExists, match="not a committed kdm artifact"):
        generate.generate_pairs(teacher_dir, make_cfg(), str(out), progress=False)
    assert (out / "notes.txt").read_text() == "mine"


# --- on-disk format ----------------------------------------------------------------------------------

def test_layout_readable_with_plain_zarr(teacher_dir, reference):
    out, version = reference
    g = zarr.open_group(out, mode="r")
    arrays = dict(g.arrays())
    assert set(arrays) == {"x_T", "x_0", "label", "seed"}
    n = TRAIN[1] - TRAIN[0]
    expect = {"x_T": ("float32", (n, 2), (CHUNK, 2)), "x_0": ("float32", (n, 2), (CHUNK, 2)),
              "label": ("int32", (n,), (CHUNK,)), "seed": ("int64", (n,), (CHUNK,))}
    for name, (dtype, shape, chunks) in expect.items():
        a = arrays[name]
        assert (str(a.dtype), a.shape, a.chunks) == (dtype, shape, chunks), name
    assert np.all(g["label"][:] == -1)
    assert np.array_equal(g["seed"][:], np.arange(*TRAIN))

    man = g.attrs["kdm"]
    tm = teacher.read_teacher_manifest(teacher_dir)
    assert man["format"] == "kdm-pairs" and man["version"] == version
    assert man["split"] == "train" and man["origin"] == "teacher"
    assert man["count"] == n and man["chunk_size"] == CHUNK
    assert man["seeds"] == {"start": TRAIN[0], "stop": TRAIN[1]}
    assert man["sampler"] == {"kind": "flow-matching-ode", "method": "euler", "steps": 3, "noise_scale": 1.0}
    assert man["teacher"]["id"] == tm.id and man["teacher"]["sha256"] == tm.weights_sha256
    assert len(man["teacher"]["sha256"]) == 64
    assert man["content_hash"] == pairstore.content_hash(g)
    assert man["code_version"]
    assert man["arrays"]["x_0"]["chunks"] == [CHUNK, 2]
    assert "kdm_status" not in g.attrs
    PairStoreManifest.model_validate(man)

    assert "heldout" in set(g.group_keys())
    h = g["heldout"]
    hm = h.attrs["kdm"]
    assert hm["split"] == "heldout" and hm["version"] == f"{version}-heldout"
    assert hm["seeds"] == {"start": HELD[0], "stop": HELD[1]}
    assert np.array_equal(h["seed"][:], np.arange(*HELD))
    assert h["x_0"].shape == (HELD[1] - HELD[0], 2)
    assert hm["content_hash"] == pairstore.content_hash(h)
    # no work-in-progress leftovers in a committed store
    assert not (Path(out) / generate.PROGRESS_DIR).exists()
    assert not (Path(out) / "heldout" / generate.PROGRESS_DIR).exists()
    assert not Path(artifacts.partial_url(out)).exists()


def test_pairstore_api(reference):
    s = PairStore.open(reference[0])
    assert len(s) == 600 and s.version == reference[1]
    held = s.heldout()
    assert held is not None and len(held) == 100 and held.heldout() is None
    starts, total = [], 0
    for start, chunk in s.iter_chunks(("seed",)):
        starts.append(start)
        assert np.array_equal(chunk["seed"], np.arange(start, start + len(chunk["seed"])))
        total += len(chunk["seed"])
    assert starts == [0, 200, 400] and total == 600
    s.verify()


def test_no_heldout_group_without_heldout_seeds(teacher_dir, tmp_path):
    out = str(tmp_path / "noheld")
    generate.generate_pairs(teacher_dir, make_cfg(train=(0, 50), held=None, chunk=20), out, progress=False)
    s = PairStore.open(out)
    assert s.heldout() is None
    assert s.group["x_0"].chunks == (20, 2) and len(s) == 50


# --- interruption and resume -------------------------------------------------------------------------

class Crash(RuntimeError):
    pass


def crash_after(k):
    seen = []

    def on_shard(i, n):
        seen.append(i)
        if len(seen) >= k:
            raise Crash(f"simulated kill after shard {i}")
    return on_shard


def test_interrupted_generate_resumes_to_a_byte_identical_store(teacher_dir, reference, tmp_path):
    out = str(tmp_path / "resumed")
    with pytest.raises(Crash):
        generate.generate_pairs(teacher_dir, make_cfg(), out, progress=False, on_shard=crash_after(1))
    partial = Path(artifacts.partial_url(out))
    assert partial.is_dir() and not Path(out).exists()
    assert sorted(p.name for p in (partial / generate.PROGRESS_DIR).iterdir()) == ["shard-000000.done"]
    with pytest.raises(ArtifactMissing):
        PairStore.open(out)
    with pytest.raises(ArtifactMissing, match="incomplete"):   # the half-written group is not trusted
        PairStore.open(str(partial))

    redone = []
    v = generate.generate_pairs(teacher_dir, make_cfg(), out, progress=False, on_shard=lambda i, n: redone.append(i))
    assert v == reference[1]
    assert redone == [1, 2, 0]                 # train shards 1 and 2, then the held-out shard; not shard 0
    assert not partial.exists()
    assert_same_store(reference[0], out)


def test_shard_written_without_marker_is_recomputed(teacher_dir, reference, tmp_path):
    """A kill between a shard's data and its marker: the shard is redone, garbage included."""
    out = str(tmp_path / "torn")
    with pytest.raises(Crash):
        generate.generate_pairs(teacher_dir, make_cfg(), out, progress=False, on_shard=crash_after(2))
    partial = artifacts.partial_url(out)
    (Path(partial) / generate.PROGRESS_DIR / "shard-000001.done").unlink()
    g = zarr.open_group(partial, mode="r+")
    g["x_0"][200:400] = np.full((200, 2), 123.0, np.float32)     # torn data of shard 1
    generate.generate_pairs(teacher_dir, make_cfg(), out, progress=False)
    assert_same_store(reference[0], out)


@pytest.mark.parametrize("fault", ("delete", "flip", "rewrite", "old-marker-delete"))
def test_finished_shard_damaged_before_resume_is_recomputed(teacher_dir, reference, tmp_path, fault, caplog):
    """A finished shard (marker written) whose chunk is lost or altered before the resumed run commits is
    computed again: the committed store equals an uninterrupted run, never zeros."""
    out = str(tmp_path / "damaged")
    with pytest.raises(Crash):
        generate.generate_pairs(teacher_dir, make_cfg(), out, progress=False, on_shard=crash_after(2))
    partial = Path(artifacts.partial_url(out))
    marker = partial / generate.PROGRESS_DIR / "shard-000000.done"
    assert set(json.loads(marker.read_text())) == {"x_T", "x_0", "label", "seed"}
    chunk = partial / "x_0" / "c" / "0" / "0"
    if fault.endswith("delete"):
        os.remove(chunk)
        if fault.startswith("old-marker"):
            marker.write_bytes(b"")          # a marker written before markers held digests
    elif fault == "flip":
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0xFF
        chunk.write_bytes(bytes(data))
    else:
        zarr.open_group(str(partial), mode="r+")["x_0"][0:200] = np.zeros((200, 2), np.float32) + 1
    redone = []
    with caplog.at_level("WARNING", logger="kdm.generate"):
        v = generate.generate_pairs(teacher_dir, make_cfg(), out, progress=False, on_shard=lambda i, n: redone.append(i))
    assert v == reference[1]
    assert redone == [2, 0, 0]               # the last train shard, the held-out shard, then shard 0 again
    assert "recomputing 1 finished shard" in caplog.text and "train shard 0" in caplog.text
    assert_same_store(reference[0], out)
    PairStore.open(out).verify()


def test_kill_while_creating_the_arrays_is_recovered(teacher_dir, reference, tmp_path):
    out = str(tmp_path / "half-created")
    g = zarr.open_group(artifacts.begin(out), mode="w", zarr_format=3)
    g.create_array("x_T", shape=(600, 2), chunks=(CHUNK, 2), dtype="float32")   # the other arrays never came
    generate.generate_pairs(teacher_dir, make_cfg(), out, progress=False)
    assert_same_store(reference[0], out)


def test_partial_of_another_config_is_not_reused(teacher_dir, tmp_path):
    """A killed run of config X must not lend its shards to a later run of config Y at the same out."""
    out = str(tmp_path / "switched")
    with pytest.raises(Crash):
        generate.generate_pairs(teacher_dir, make_cfg(steps=1), out, progress=False, on_shard=crash_after(2))
    redone = []
    v = generate.generate_pairs(teacher_dir, make_cfg(steps=3), out, progress=False,
                                on_shard=lambda i, n: redone.append(i))
    assert redone == [0, 1, 2, 0]              # every shard computed again
    clean = str(tmp_path / "clean")
    assert generate.generate_pairs(teacher_dir, make_cfg(steps=3), clean, progress=False) == v
    assert_same_store(clean, out)
    assert PairStore.open(out).manifest.sampler.steps == 3
    assert pairstore.WRITING_KEY not in zarr.open_group(out, mode="r").attrs


def test_begin_keeps_or_wipes_a_partial(tmp_path):
    url = str(tmp_path / "art")
    tmp = artifacts.begin(url)
    assert tmp == url + ".partial"
    (Path(tmp) / "keep.me").write_text("x")
    assert (Path(artifacts.begin(url)) / "keep.me").exists()
    assert not (Path(artifacts.begin(url, fresh=True)) / "keep.me").exists()
    artifacts.write_json(artifacts.join(tmp, artifacts.MANIFEST), {"version": "v"})
    artifacts.commit(url)
    assert artifacts.committed(url) and not Path(tmp).exists()
    artifacts.begin(url)
    with pytest.raises(ArtifactExists, match="refusing to overwrite"):
        artifacts.commit(url)


# --- integrity ---------------------------------------------------------------------------------------

def test_group_without_manifest_is_reported_incomplete(tmp_path):
    url = str(tmp_path / "bare")
    pairstore.create_arrays(url, 10, (2,), 5)
    with pytest.raises(ArtifactMissing) as e:
        PairStore.open(url)
    assert "incomplete" in str(e.value) and "without a kdm manifest" in str(e.value)


def test_missing_store_is_reported(tmp_path):
    with pytest.raises(ArtifactMissing, match="no pair store at"):
        PairStore.open(str(tmp_path / "nothing"))


def test_invalid_manifest_names_the_field(tmp_path, reference):
    url = str(tmp_path / "badman")
    shutil.copytree(reference[0], url)
    g = zarr.open_group(url, mode="r+")
    man = dict(g.attrs["kdm"])
    man["count"] = -5
    g.attrs["kdm"] = man
    with pytest.raises(KDMError) as e:
        PairStore.open(url)
    assert "count" in str(e.value) and "attribute 'kdm'" in str(e.value)


def test_verify_detects_tampering(tmp_path, reference):
    url = str(tmp_path / "tampered")
    shutil.copytree(reference[0], url)
    PairStore.open(url).verify()
    g = zarr.open_group(url, mode="r+")
    x = g["x_0"][250]
    g["x_0"][250] = x + np.float32(1e-3)      # a valid chunk (crc32c fine) with other data
    with pytest.raises(KDMError, match=r"array 'x_0', chunk 1 \(rows 200-399.*does not match the checksum"):
        PairStore.open(url).verify()
    man = dict(g.attrs["kdm"])                  # a store without chunk digests: the content hash still checks
    man.pop("chunk_digests")
    g.attrs["kdm"] = man
    with pytest.raises(KDMError, match="content hash mismatch"):
        PairStore.open(url).verify()


def test_content_hash_covers_every_array_and_its_dtype(tmp_path):
    def build(name, seed_dtype_shift=0):
        g = pairstore.create_arrays(str(tmp_path / name), 4, (2,), 2)
        pairstore.write_region(g, 0, {"x_T": np.zeros((4, 2)), "x_0": np.ones((4, 2)),
                                      "label": np.full(4, -1), "seed": np.arange(4) + seed_dtype_shift})
        return pairstore.content_hash(g)
    assert build("a") == build("b")
    assert build("a") != build("c", seed_dtype_shift=1)
    with pytest.raises(ValueError, match="disagree in length"):
        g = pairstore.create_arrays(str(tmp_path / "d"), 4, (2,), 2)
        pairstore.write_region(g, 0, {"x_T": np.zeros((4, 2)), "x_0": np.ones((3, 2))})


def test_teacher_weights_are_checked_on_load(teacher_dir, tmp_path):
    copy = tmp_path / "teacher"
    shutil.copytree(teacher_dir, copy)
    m = json.loads((copy / "manifest.json").read_text())
    assert m["id"].startswith("fm-") and m["kind"] == "flow-matching-mlp"
    w = bytearray((copy / "weights.safetensors").read_bytes())
    w[-1] ^= 0xFF
    (copy / "weights.safetensors").write_bytes(bytes(w))
    with pytest.raises(KDMError, match="does not match the manifest"):
        teacher.load_teacher(str(copy))


def test_generate_to_an_fsspec_url(teacher_dir, reference):
    url = "memory://kdm-test-bucket/pairs"
    try:
        v = generate.generate_pairs(teacher_dir, make_cfg(), url, progress=False)
        assert v == reference[1]
        s = PairStore.open(url)
        s.verify()
        assert s.manifest.content_hash == PairStore.open(reference[0]).manifest.content_hash
        assert len(s.heldout()) == 100
        assert not artifacts.exists(artifacts.partial_url(url))
    finally:
        fs, path = artifacts.url_to_fs(url)
        if fs.exists(path):
            fs.rm(path, recursive=True)


def test_a_second_writer_on_the_same_out_is_refused_while_the_first_lives(teacher_dir, reference, tmp_path):
    import socket
    out = str(tmp_path / "locked")
    lock = Path(out + ".lock")
    lock.write_text(f"{socket.gethostname()} {os.getpid()}")          # a live writer: this very process
    with pytest.raises(KDMError, match=r"another `kdm pairs generate` \(pid \d+\) is writing"):
        generate.generate_pairs(teacher_dir, make_cfg(), out, progress=False)
    assert not Path(artifacts.partial_url(out)).exists()
    lock.write_text(f"{socket.gethostname()} 999999999")               # left by a killed run: taken over
    assert generate.generate_pairs(teacher_dir, make_cfg(), out, progress=False) == reference[1]
    assert not lock.exists()
    assert_same_store(reference[0], out)
