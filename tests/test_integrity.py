"""Fault injection: a damaged pair store is never read as data, a damaged checkpoint is never resumed from,
and bad outputs / inputs end in a clear error.

For each array of each split and each fault (chunk file deleted, truncated, one byte flipped, or rewritten
with other valid data), every reader fails with an error that names the store, the array and the chunk.
"""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline import presets
from pipeline.cli.app import main
from pipeline.errors import ArtifactExists, DataCorrupt, KDMError
from pipeline.evaluation import evaluate2d
from pipeline.pairs import filter as filt
from pipeline.pairs import importer
from pipeline.storage import artifacts, checkpoints, pairstore
from pipeline.storage.pairstore import PairStore
from pipeline.training import train2d as train
from pipeline.training.image_data import ChunkShuffleSampler
from storage_schemas import (PAIR_ARRAYS, Eval2DConfig, FilterConfig, SamplerSettings, SeedRange, TeacherRef,
                             code_version, utc_now)

N_TRAIN, N_HELD, CHUNK = 600, 200, 200
FAULTS = ("delete", "truncate", "flip", "rewrite")


def write_store(url: str, digests: bool = True, dim: int = 2) -> str:
    """A committed 2-D store (train 600 + held out 200, chunks of 200) of checkerboard-like random pairs."""
    rng = np.random.default_rng(0)
    common = dict(origin="teacher", chunk_size=CHUNK, sampler=SamplerSettings(method="euler", steps=3),
                  teacher=TeacherRef(id="t-0000000000", sha256="0" * 64, kind="flow-matching-mlp"),
                  code_version=code_version(), created=utc_now())
    groups = []
    for split, sub, n, s0 in (("train", url, N_TRAIN, 0), ("heldout", artifacts.join(url, "heldout"), N_HELD, N_TRAIN)):
        g = pairstore.create_arrays(sub, n, (dim,), CHUNK)
        pairstore.write_region(g, 0, {"x_T": rng.standard_normal((n, dim)), "x_0": rng.uniform(-2, 2, (n, dim)),
                                      "label": np.full(n, -1), "seed": np.arange(s0, s0 + n)})
        groups.append((split, g, SeedRange(start=s0, stop=s0 + n)))
    for split, g, seeds in reversed(groups):
        pairstore.finalize(g, version="pairs-test0001" + ("-heldout" if split == "heldout" else ""), split=split,
                           seeds=seeds, **common)
        if not digests:
            man = dict(g.attrs["kdm"])
            man.pop("chunk_digests")
            g.attrs["kdm"] = man
    return url


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return write_store(str(tmp_path_factory.mktemp("clean") / "pairs"))


def chunk_file(url: str, split: str, name: str, c: int) -> Path:
    base = Path(url) / ("heldout" if split == "heldout" else "")
    return base / name / "c" / str(c) / ("0" if name in ("x_T", "x_0") else "")


def damage(url: str, split: str, name: str, c: int, fault: str) -> None:
    f = chunk_file(url, split, name, c)
    f = f if f.is_file() else f.parent / f.name          # 1-D arrays: c/<i>
    if fault == "delete":
        os.remove(f)
    elif fault == "truncate":
        data = f.read_bytes()
        f.write_bytes(data[:len(data) // 2])
    elif fault == "flip":
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    else:   # valid chunk, other data (crc32c passes): only the manifest's digest catches it
        g = zarr.open_group(str(Path(url) / ("heldout" if split == "heldout" else "")), mode="r+")
        a = g[name]
        rows = a[c * CHUNK:(c + 1) * CHUNK]
        a[c * CHUNK:(c + 1) * CHUNK] = rows + np.asarray(1, rows.dtype)


def copy_damaged(clean: str, tmp_path: Path, split="train", name="x_T", c=1, fault="delete") -> str:
    url = str(tmp_path / f"p-{split}-{name}-{fault}")
    shutil.copytree(clean, url)
    damage(url, split, name, c, fault)
    return url


def chunk_pattern(name: str, c: int) -> str:
    return rf"array '{name}', chunk {c} \(rows {c * CHUNK}-{(c + 1) * CHUNK - 1}"


# --- every array of every split, every fault: open + read + verify --------------------------------------------

@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("name", PAIR_ARRAYS)
@pytest.mark.parametrize("split", ("train", "heldout"))
def test_every_chunk_fault_is_named_by_load_and_verify(clean, tmp_path, split, name, fault):
    c = 1 if split == "train" else 0
    url = copy_damaged(clean, tmp_path, split, name, c, fault)
    s = PairStore.open(url)
    part = s if split == "train" else s.heldout()
    with pytest.raises(DataCorrupt, match=chunk_pattern(name, c)) as e:
        part.load()
    assert url in str(e.value)
    if fault == "delete":
        assert "is missing" in str(e.value)
    with pytest.raises(DataCorrupt, match=chunk_pattern(name, c)):
        s.verify()                                  # the root's verify covers the held-out split too
    other = [n for n in PAIR_ARRAYS if n != name]
    assert all(len(v) == len(part) for v in part.load(other).values())   # the other arrays still read


@pytest.mark.parametrize("fault", ("delete", "flip", "truncate"))
def test_stores_without_digests_still_catch_missing_and_corrupt_chunks(tmp_path, fault):
    url = write_store(str(tmp_path / "legacy"), digests=False)
    assert "chunk_digests" not in zarr.open_group(url, mode="r").attrs["kdm"]
    PairStore.open(url).verify()
    damage(url, "train", "x_0", 2, fault)
    with pytest.raises(DataCorrupt, match=chunk_pattern("x_0", 2)):
        PairStore.open(url).load(("x_0",))


def test_reads_of_intact_chunks_are_unchanged(clean):
    s = PairStore.open(clean)
    g = zarr.open_group(clean, mode="r")
    for name in PAIR_ARRAYS:
        assert np.array_equal(s.read(name), g[name][:])
        assert np.array_equal(s.read(name, 150, 420), g[name][150:420])
    assert s.manifest.content_hash == pairstore.content_hash(g)
    assert s.verify() == 4 * 3 + 4 * 1


# --- each stage that reads a store --------------------------------------------------------------------------

def test_filter_refuses_a_damaged_store_and_writes_nothing(clean, tmp_path):
    url = copy_damaged(clean, tmp_path)
    out = tmp_path / "filtered"
    with pytest.raises(DataCorrupt, match=chunk_pattern("x_T", 1)):
        filt.filter_pairs(url, FilterConfig(), str(out))
    assert not out.exists()
    held = copy_damaged(clean, tmp_path, "heldout", "x_0", 0, "flip")
    with pytest.raises(DataCorrupt, match=chunk_pattern("x_0", 0)):
        filt.filter_pairs(held, FilterConfig(), str(tmp_path / "filtered2"))


def test_filtered_store_has_digests_and_verifies(clean, tmp_path):
    out = str(tmp_path / "f")
    filt.filter_pairs(clean, FilterConfig(), out)
    s = PairStore.open(out)
    assert set(s.manifest.chunk_digests) == {*PAIR_ARRAYS, "source_index"}
    assert s.manifest.heldout.version == "pairs-test0001-heldout"
    s.verify()


def student_cfg(steps=10):
    return presets.load("student", "smoke", sets=[f"train.steps={steps}", "train.checkpoint_every=5",
                                                  "train.threads=1", "train.batch_size=64"])


def test_training_refuses_a_damaged_store_before_writing(clean, tmp_path):
    url = copy_damaged(clean, tmp_path)
    out = tmp_path / "run"
    with pytest.raises(DataCorrupt, match=chunk_pattern("x_T", 1)):
        train.train_student(url, student_cfg(), str(out), progress=False)
    assert not (out / "config.json").exists()


def test_export_refuses_a_damaged_store(clean, tmp_path):
    url = copy_damaged(clean, tmp_path, "heldout", "x_T", 0, "truncate")
    importer.export_kdm_npz(url, str(tmp_path / "ok"), split="train")
    with pytest.raises(DataCorrupt, match=chunk_pattern("x_T", 0)):
        importer.export_kdm_npz(url, str(tmp_path / "bad"), split="heldout")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("direct", (True, False))
@pytest.mark.parametrize("fault", ("delete", "flip", "rewrite"))
def test_chunk_shuffle_sampler_refuses_a_damaged_chunk(clean, tmp_path, direct, fault):
    url = copy_damaged(clean, tmp_path, "train", "x_0", 2, fault)
    sampler = ChunkShuffleSampler(url, 100, direct_reads=direct, read_threads=2, prefetch=0)
    with pytest.raises(DataCorrupt, match=r"chunk 2"):
        for _ in sampler.iter_epoch(0):
            pass


@pytest.fixture(scope="module")
def student(clean, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("student") / "run")
    train.train_student(clean, student_cfg(), out, progress=False)
    return out


def test_evaluation_refuses_a_damaged_or_missing_heldout_split(clean, student, tmp_path):
    cfg = Eval2DConfig(num_samples=100, plots=False)
    evaluate2d.evaluate_student(student, clean, cfg, str(tmp_path / "ok"))
    url = copy_damaged(clean, tmp_path, "heldout", "x_0", 0, "delete")
    with pytest.raises(DataCorrupt, match=chunk_pattern("x_0", 0)):
        evaluate2d.evaluate_student(student, url, cfg, str(tmp_path / "ev"))
    assert not (tmp_path / "ev" / "report.json").exists()
    gone = str(tmp_path / "nohd")
    shutil.copytree(clean, gone)
    shutil.rmtree(Path(gone) / "heldout")
    with pytest.raises(DataCorrupt, match="held-out split 'heldout' .* is missing"):
        evaluate2d.evaluate_student(student, gone, cfg, str(tmp_path / "ev2"))
    with pytest.raises(DataCorrupt, match="held-out split 'heldout' .* is missing"):
        PairStore.open(gone).verify()


# --- the command line ---------------------------------------------------------------------------------------

def test_pairs_info_verify_names_the_chunk_without_asyncio_noise(clean, tmp_path, capfd):
    assert main(["pairs", "info", clean, "--verify"]) == 0
    out = capfd.readouterr().out
    assert "all 16 chunks verified (train and held out)" in out and "chunk_digests" not in out
    for split, name, c in (("train", "x_0", 1), ("heldout", "seed", 0)):
        url = copy_damaged(clean, tmp_path, split, name, c, "flip")
        assert main(["pairs", "info", url, "--verify"]) == 1
        err = capfd.readouterr().err
        assert f"array '{name}', chunk {c}" in err and url in err
        assert "Task was destroyed" not in err and "Traceback" not in err
        assert len(err.strip().splitlines()) <= 2


def test_train_out_refuses_what_is_not_a_run_of_this_config(clean, tmp_path, capfd):
    base = ["train", "--pairs", clean, "--preset", "smoke", "--set", "train.steps=5", "--set", "train.threads=1", "-q"]
    cases = {}
    store = tmp_path / "store"
    shutil.copytree(clean, store)
    cases["store"] = (store, "a committed pair store")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    cases["other"] = (other, "not empty")
    teacher_like = tmp_path / "teacher"
    teacher_like.mkdir()
    (teacher_like / "manifest.json").write_text(json.dumps({"format": "kdm-teacher"}))
    cases["teacher"] = (teacher_like, "another kind of artifact")
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases["file"] = (afile, "is a file")
    for key, (path, msg) in cases.items():
        before = sorted(p.name for p in path.iterdir()) if path.is_dir() else path.read_text()
        assert main(base + ["--out", str(path)]) == 1, key
        err = capfd.readouterr().err
        assert msg in err and "Traceback" not in err, (key, err)
        assert (sorted(p.name for p in path.iterdir()) if path.is_dir() else path.read_text()) == before, key
    assert main(base + ["--out", str(tmp_path / "fresh")]) == 0          # a new directory works
    assert main(base + ["--out", str(tmp_path / "fresh")]) == 0          # and again: the same run, a no-op


def test_manifest_faults_are_clear(clean, tmp_path):
    url = str(tmp_path / "m")
    shutil.copytree(clean, url)
    g = zarr.open_group(url, mode="r+")
    man = dict(g.attrs["kdm"])
    g.attrs["kdm"] = {**man, "schema_version": 99}
    with pytest.raises(KDMError, match="schema_version 99 is newer"):
        PairStore.open(url)
    g.attrs["kdm"] = {**man, "chunk_digests": {**man["chunk_digests"], "x_0": man["chunk_digests"]["x_0"][:1]}}
    with pytest.raises(KDMError, match="chunk_digests"):
        PairStore.open(url)
    g.attrs["kdm"] = man
    os.remove(Path(url) / "x_0" / "zarr.json")
    with pytest.raises(DataCorrupt, match="array 'x_0' is missing"):
        PairStore.open(url)


def test_sample_rejects_bad_num_and_a_directory_out(student, tmp_path, capfd):
    assert main(["sample", "--student", student, "--num", "0", "--seed", "0", "--out", str(tmp_path / "s.npy")]) == 1
    assert "--num must be at least 1" in capfd.readouterr().err
    assert main(["sample", "--student", student, "--num", "5", "--seed", "0", "--out", str(tmp_path)]) == 1
    assert "is a directory" in capfd.readouterr().err
    assert main(["sample", "--student", student, "--num", "5", "--seed", "0", "--out", str(tmp_path / "w")]) == 0
    assert str(tmp_path / "w.npy") in capfd.readouterr().out and np.load(tmp_path / "w.npy").shape == (5, 2)


def test_training_refuses_non_finite_and_empty_pairs(tmp_path):
    url = write_store(str(tmp_path / "nan"))
    g = zarr.open_group(url, mode="r+")
    g["x_0"][3] = np.array([np.nan, 0], np.float32)
    man = dict(g.attrs["kdm"])
    man.pop("chunk_digests")                       # make the edit "legitimate"
    man["content_hash"] = pairstore.content_hash(g)
    g.attrs["kdm"] = man
    with pytest.raises(KDMError, match="non-finite values .*x_0 1.*kdm pairs filter"):
        train.train_student(url, student_cfg(), str(tmp_path / "run"), progress=False)


# --- checkpoints --------------------------------------------------------------------------------------------

def _save(run: Path, step: int, keep: int = 3) -> Path:
    torch.manual_seed(step)
    return checkpoints.save_checkpoint(run, step, keep, modules={"model": torch.nn.Linear(4, 4)},
                                       objects={"optimizer": {"lr": torch.tensor(float(step))}})


@pytest.mark.parametrize("what", ("truncate-weights", "truncate-pt", "flip", "state", "legacy-truncate"))
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, what, caplog):
    run = tmp_path / "run"
    _save(run, 10)
    newest = _save(run, 20)
    if what.startswith("legacy"):
        for ck in (run / "checkpoints").iterdir():     # checkpoints written before file records existed
            st = json.loads((ck / "state.json").read_text())
            st.pop(checkpoints.FILES_KEY)
            (ck / "state.json").write_text(json.dumps(st))
    target = {"truncate-pt": "optimizer.pt", "state": "state.json"}.get(what, "model.safetensors")
    data = (newest / target).read_bytes()
    if what == "flip":
        (newest / target).write_bytes(data[:-3] + bytes([data[-3] ^ 1]) + data[-2:])
    elif what == "state":
        (newest / target).write_text("{\"st")
    else:
        (newest / target).write_bytes(data[:len(data) // 2])
    assert checkpoints.checkpoint_problem(newest) is not None
    with caplog.at_level("WARNING", logger="kdm.checkpoints"):
        ck = checkpoints.latest_checkpoint(run)
    assert "step-00000020 is damaged" in caplog.text and "resumes from the previous checkpoint" in caplog.text
    assert ck is not None and ck.name == "step-00000010"
    assert checkpoints.read_state(ck) == {"step": 10}
    assert not newest.exists() and (run / "checkpoints" / ".damaged-step-00000020").is_dir()
    again = _save(run, 20, keep=2)                  # the resumed run writes the step again; nothing is pruned wrongly
    assert checkpoints.latest_checkpoint(run) == again


def test_training_resumes_from_the_previous_checkpoint_when_the_newest_is_truncated(clean, tmp_path, caplog):
    out = tmp_path / "run"
    cfg = student_cfg(steps=20)
    assert train.train_student(clean, cfg, str(out), progress=False, stop_after=15)
    ck = out / "checkpoints" / "step-00000015"
    data = (ck / "ema.safetensors").read_bytes()
    (ck / "ema.safetensors").write_bytes(data[:100])
    resumed = []
    with caplog.at_level("WARNING", logger="kdm.checkpoints"):
        train.train_student(clean, cfg, str(out), progress=False, on_resume=resumed.append)
    assert "ema.safetensors has 100 bytes" in caplog.text
    assert resumed == [10]
    ref = tmp_path / "ref"
    train.train_student(clean, cfg, str(ref), progress=False)
    assert (out / "student.safetensors").read_bytes() == (ref / "student.safetensors").read_bytes()


# --- other bad inputs of the command line -------------------------------------------------------------------

def test_seed_ranges_beyond_int64_or_too_many_shards_are_refused(tmp_path, capfd):
    base = ["pairs", "generate", "--teacher", str(tmp_path / "t"), "--out", str(tmp_path / "p"), "--dry-run"]
    assert main(base + ["--seeds", "0-99999999999999999999999"]) == 2
    assert "at most 9223372036854775807" in capfd.readouterr().err
    assert main(base + ["--seeds", "0-99999999999999", "--chunk-size", "10000"]) == 2
    err = capfd.readouterr().err
    assert "shards" in err and "--chunk-size" in err and "Traceback" not in err


def test_missing_teacher_says_the_path_is_wrong(tmp_path, capfd):
    assert main(["pairs", "generate", "--teacher", str(tmp_path / "nope"), "--seeds", "0-9",
                 "--out", str(tmp_path / "p"), "-q"]) == 1
    err = capfd.readouterr().err
    assert f"{tmp_path / 'nope'} does not exist" in err and "check the path" in err


def test_edited_manifest_count_is_reported_without_dumping_the_manifest(clean, tmp_path, capfd):
    url = str(tmp_path / "m")
    shutil.copytree(clean, url)
    g = zarr.open_group(url, mode="r+")
    g.attrs["kdm"] = {**g.attrs["kdm"], "count": 601}
    assert main(["pairs", "info", url]) == 1
    err = capfd.readouterr().err
    assert "count" in err and "content_hash" not in err and len(err.splitlines()) <= 4


def test_import_of_an_empty_array_is_refused(tmp_path, capfd):
    src = tmp_path / "empty.npy"
    np.save(src, np.zeros((10, 0, 2), np.float32))
    assert main(["pairs", "import", str(src), "--format", "kdm-trajectories", "--holdout", "0",
                 "--out", str(tmp_path / "p")]) == 1
    assert "holds no pairs" in capfd.readouterr().err
    assert not (tmp_path / "p").exists()


def test_train_dry_run_checks_the_model_dimension(clean, tmp_path, capfd):
    assert main(["train", "--pairs", clean, "--preset", "smoke", "--set", "model.dim=3", "--out",
                 str(tmp_path / "r"), "--dry-run"]) == 1
    assert "model.dim=3 expects (3,)" in capfd.readouterr().err


def test_os_errors_end_in_one_clear_message(clean, tmp_path, capfd, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "f" / "x_0"))
    monkeypatch.setattr(pairstore, "write_region", full)
    code = main(["pairs", "filter", "--pairs", clean, "--out", str(tmp_path / "f"), "-q"])
    err = capfd.readouterr().err
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "No space left on device" in err and "free space" in err
    assert not (tmp_path / "f").exists()


def test_import_with_nan_warns_and_training_on_it_is_refused(tmp_path, capfd, caplog):
    src = tmp_path / "nan.npy"
    arr = np.random.default_rng(0).standard_normal((3, 400, 2)).astype(np.float32)
    arr[-1, 5, 0] = np.nan
    np.save(src, arr)
    with caplog.at_level("WARNING", logger="kdm.import"):
        assert main(["pairs", "import", str(src), "--format", "kdm-trajectories", "--holdout", "0",
                     "--out", str(tmp_path / "p")]) == 0
    assert "1 train and 0 held-out pairs hold NaN/Inf" in caplog.text and "kdm pairs filter" in caplog.text
    assert main(["train", "--pairs", str(tmp_path / "p"), "--preset", "smoke", "--set", "train.steps=5",
                 "--out", str(tmp_path / "r"), "-q"]) == 1
    assert "non-finite" in capfd.readouterr().err and not (tmp_path / "r").exists()


def test_content_hash_is_the_one_stores_were_committed_with(clean):
    """The one-pass scan gives the same content hash as the original block-wise definition."""
    import hashlib
    g = zarr.open_group(clean, mode="r")
    h = hashlib.sha256()
    for name in PAIR_ARRAYS:
        a = g[name]
        h.update(f"{name}|{a.dtype}|{a.shape}|".encode())
        for s in range(0, a.shape[0], 65536):
            h.update(np.ascontiguousarray(a[s:s + 65536]).astype(a.dtype.newbyteorder("<")).tobytes())
    assert pairstore.content_hash(g) == h.hexdigest() == PairStore.open(clean).manifest.content_hash


def test_a_second_trainer_on_the_same_out_is_refused_while_the_first_lives(clean, tmp_path):
    import socket
    out = tmp_path / "run"
    lock = Path(str(out) + ".lock")
    lock.write_text(f"{socket.gethostname()} {os.getpid()}")
    with pytest.raises(KDMError, match=r"another `kdm train` \(pid \d+\) is writing"):
        train.train_student(clean, student_cfg(), str(out), progress=False)
    assert not out.exists()
    lock.write_text(f"{socket.gethostname()} 999999999")            # a killed trainer's lock is taken over
    train.train_student(clean, student_cfg(), str(out), progress=False)
    assert (out / "manifest.json").exists() and not lock.exists()


def test_evaluate_refuses_pairs_of_another_dimension(student, tmp_path, capfd):
    url = write_store(str(tmp_path / "p3"), dim=3)
    assert main(["evaluate", "--student", student, "--pairs", url, "--out", str(tmp_path / "ev" / "report.json")]) == 1
    err = capfd.readouterr().err
    assert "generates 2-D points" in err and "(3,)" in err and "Traceback" not in err
    assert not (tmp_path / "ev").exists()          # a failed evaluation leaves no empty --out behind


def test_training_refuses_a_store_whose_content_hash_was_edited(clean, tmp_path):
    url = str(tmp_path / "ch")
    shutil.copytree(clean, url)
    g = zarr.open_group(url, mode="r+")
    g.attrs["kdm"] = {**g.attrs["kdm"], "content_hash": "0" * 64}
    with pytest.raises(DataCorrupt, match="content hash mismatch"):
        train.train_student(url, student_cfg(), str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("seeds", (["--seeds", "-5-10"], ["--seeds=-5-10"]))
def test_negative_seeds_are_explained(tmp_path, capfd, seeds):
    assert main(["pairs", "generate", "--teacher", str(tmp_path / "t"), *seeds, "--out", str(tmp_path / "p"),
                 "--dry-run"]) == 2
    assert "seeds are non-negative integers" in capfd.readouterr().err


def test_checked_view_slices_like_zarr_and_checks_chunks(clean, tmp_path):
    s, g = PairStore.open(clean), zarr.open_group(clean, mode="r")
    for name in PAIR_ARRAYS:
        v = s.checked[name]
        assert v.shape == g[name].shape and len(v) == g[name].shape[0]
        assert np.array_equal(v[130:470], g[name][130:470]) and np.array_equal(v[:], g[name][:])
        assert np.array_equal(v[5], g[name][5]) and np.array_equal(v[-1], g[name][-1])
    assert np.array_equal(s.checked["x_0"][10:20, 1], g["x_0"][10:20, 1])
    url = copy_damaged(clean, tmp_path, "train", "x_0", 2, "delete")
    with pytest.raises(DataCorrupt, match=chunk_pattern("x_0", 2)):
        PairStore.open(url).checked["x_0"][350:450]


def test_a_committed_artifact_as_out_is_named_and_kept(clean, student, tmp_path, capfd):
    """Writing one kind of artifact onto another names what is there and never suggests deleting it."""
    before = sorted(p.name for p in Path(student).iterdir())
    code = main(["pairs", "filter", "--pairs", clean, "--out", student, "-q"])
    err = capfd.readouterr().err
    assert code == 1 and "holds a committed student artifact (kdm-student)" in err and "remove" not in err
    assert sorted(p.name for p in Path(student).iterdir()) == before


def test_evaluate_keeps_the_report_of_another_student(clean, student, tmp_path, capfd):
    out = tmp_path / "ev" / "report.json"
    assert main(["evaluate", "--student", student, "--pairs", clean, "--out", str(out), "--set", "plots=false",
                 "--set", "num_samples=50", "--set", "swd_projections=8"]) == 0
    first = out.read_bytes()
    other = tmp_path / "other"
    train.train_student(clean, student_cfg(steps=5), str(other), progress=False)
    capfd.readouterr()
    assert main(["evaluate", "--student", str(other), "--pairs", clean, "--out", str(out)]) == 1
    err = capfd.readouterr().err
    assert "holds the report of student" in err and "choose another --out (it is kept)" in err
    assert out.read_bytes() == first
    # the same student and pairs again: the report is recomputed in place
    assert main(["evaluate", "--student", student, "--pairs", clean, "--out", str(out), "--set", "plots=false",
                 "--set", "num_samples=50", "--set", "swd_projections=8"]) == 0


def test_a_full_disk_while_writing_a_checkpoint_is_one_clear_line(clean, tmp_path, capfd, monkeypatch):
    def full(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    monkeypatch.setattr(checkpoints.torch, "save", full)
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 ** 9, 10 ** 9, 4096))
    code = main(["train", "--pairs", clean, "--preset", "smoke", "--set", "train.steps=10",
                 "--set", "train.checkpoint_every=5", "--set", "train.threads=1", "--out", str(tmp_path / "run"), "-q"])
    err = capfd.readouterr().err
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "No space left on device (4096 bytes free) while writing a checkpoint" in err and "optimizer.pt" in err
    assert "inline_container" not in err


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A store written by the importer: its manifest records what its version hashes."""
    d = tmp_path_factory.mktemp("imported")
    traj = np.random.default_rng(3).standard_normal((3, 500, 2)).astype(np.float32)
    np.save(d / "traj.npy", traj)
    out = str(d / "pairs")
    importer.import_pairs(str(d / "traj.npy"), importer.PairsImportConfig(holdout_fraction=0.2, chunk_size=100), out)
    return out


def _edit(url: str, **fields) -> None:
    g = zarr.open_group(url, mode="r+")
    g.attrs["kdm"] = {**g.attrs["kdm"], **fields}


def test_the_version_is_recomputed_from_the_recorded_inputs(imported):
    store = PairStore.open(imported)
    m = store.manifest
    assert m.version_inputs is not None and m.version_inputs.version == m.version
    assert m.version_inputs.prefix == "import" and m.version_inputs.mentions(m.import_info.source_sha256)
    held = store.heldout().manifest
    assert held.version == f"{m.version}-heldout" and held.version_inputs == m.version_inputs


def test_a_forged_version_is_refused_by_every_reader(imported, tmp_path, capfd):
    url = str(tmp_path / "forged")
    shutil.copytree(imported, url)
    true_version = PairStore.open(url).version
    _edit(url, version="pairs-0000000000000000")
    with pytest.raises(KDMError, match=f"version pairs-0000000000000000 is not the hash of its recorded inputs "
                                       f"\\({true_version}\\)"):
        PairStore.open(url)
    assert main(["pairs", "info", url, "--verify"]) == 1
    err = capfd.readouterr().err.strip()
    assert "pairs-0000000000000000" in err and "Traceback" not in err and len(err.splitlines()) <= 2
    with pytest.raises(KDMError, match="not the hash of its recorded inputs"):
        train.train_student(url, student_cfg(), str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()


def test_a_forged_heldout_version_or_forged_inputs_are_refused(imported, tmp_path):
    url = str(tmp_path / "held")
    shutil.copytree(imported, url)
    held = artifacts.join(url, "heldout")
    _edit(held, version="pairs-0000000000000000-heldout")
    with pytest.raises(KDMError, match="not the hash of its recorded inputs"):
        PairStore.open(url).heldout()
    # inputs and version edited together, to claim another source: the recorded source is not among them
    url2 = str(tmp_path / "inputs")
    shutil.copytree(imported, url2)
    m = PairStore.open(url2).manifest
    from storage_schemas import VersionInputs
    forged = VersionInputs.of("import", *[("0" * 64 if p == m.import_info.source_sha256 else p)
                                          for p in m.version_inputs.parts])
    _edit(url2, version=forged.version, version_inputs=forged.model_dump(mode="json"),
          heldout={**m.heldout.model_dump(mode="json"), "version": f"{forged.version}-heldout"})
    with pytest.raises(KDMError, match=f"import source {m.import_info.source_sha256} is not among the inputs"):
        PairStore.open(url2)


def test_stores_without_recorded_inputs_still_tie_the_version_to_the_heldout_split(clean, tmp_path):
    url = str(tmp_path / "old")
    shutil.copytree(clean, url)
    assert PairStore.open(url).manifest.version_inputs is None     # written before inputs were recorded
    _edit(url, version="pairs-0000000000000000")
    with pytest.raises(KDMError, match="does not match its held-out split's pairs-test0001-heldout"):
        PairStore.open(url)


def test_generated_and_filtered_stores_record_their_version_inputs(clean, imported, tmp_path):
    out = str(tmp_path / "f")
    version, _ = filt.filter_pairs(imported, FilterConfig(), out)
    m = PairStore.open(out).manifest
    assert m.version == version == m.version_inputs.version
    assert m.version_inputs.mentions(m.filter.source_version)
    assert PairStore.open(out).heldout().version == PairStore.open(imported).heldout().version


def test_sample_keeps_an_existing_out_that_holds_other_data(student, tmp_path, capfd):
    out = tmp_path / "s.npy"
    args = ["sample", "--student", student, "--num", "4", "--seed", "1", "--out", str(out)]
    assert main(args) == 0
    first = np.load(out)
    assert main(args) == 0 and "already holds these 4" in capfd.readouterr().out       # the same samples: a no-op
    np.save(out, np.zeros(3))
    assert main(args) == 1
    err = capfd.readouterr().err
    assert "exists and holds other data" in err and "it is kept" in err
    assert np.load(out).shape == (3,) and first.shape == (4, 2)


def test_config_errors_are_one_line_without_the_whole_config(clean, tmp_path, capfd):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\nb: }\n")
    assert main(["train", "--pairs", clean, "--config", str(bad), "--out", str(tmp_path / "r")]) == 1
    err = capfd.readouterr().err.strip()
    assert err.endswith("is not valid YAML at line 2, column 2: expected ',' or ']', but got ':'; fix the file and rerun")
    assert len(err.splitlines()) == 1
    assert main(["pairs", "generate", "--teacher", clean, "--seeds", "0-99", "--heldout-seeds", "50-150",
                 "--out", str(tmp_path / "g")]) == 1
    err = capfd.readouterr().err.strip()
    assert err == ("kdm pairs: error: invalid PairsGenerateConfig in pairs generate options: (root): heldout_seeds "
                   "50-150 overlap seeds 0-99")


def test_a_student_manifest_with_a_forged_version_is_refused(student, tmp_path, capfd):
    run = tmp_path / "s"
    shutil.copytree(student, run)
    raw = json.loads((run / "manifest.json").read_text())
    assert raw["version_inputs"]["prefix"] == "kdm" and raw["pairs_version"] in json.dumps(raw["version_inputs"])
    (run / "manifest.json").write_text(json.dumps({**raw, "version": "kdm-0000000000000000"}))
    assert main(["sample", "--student", str(run), "--num", "3", "--seed", "0", "--out", str(tmp_path / "x.npy")]) == 1
    err = capfd.readouterr().err
    assert "version kdm-0000000000000000 is not the hash of its recorded inputs" in err and "Traceback" not in err
    (run / "manifest.json").write_text(json.dumps({**raw, "pairs_version": "pairs-0000000000000000"}))
    with pytest.raises(KDMError, match="pairs version pairs-0000000000000000 is not among the inputs"):
        train.read_student_manifest(str(run))


def test_a_teacher_manifest_with_a_forged_id_is_refused(tmp_path, capfd):
    from pipeline.teachers import flow_matching
    cfg = presets.load("teacher", "smoke", None, [])
    t = tmp_path / "t"
    m = flow_matching.train_teacher(cfg, str(t), progress=False)
    assert m.version_inputs.prefix == "fm" and m.version_inputs.version == m.id
    raw = json.loads((t / "manifest.json").read_text())
    (t / "manifest.json").write_text(json.dumps({**raw, "id": "fm-0000000000000000"}))
    assert main(["pairs", "generate", "--teacher", str(t), "--seeds", "0-9", "--out", str(tmp_path / "p")]) == 1
    err = capfd.readouterr().err
    assert "version fm-0000000000000000 is not the hash of its recorded inputs" in err and "Traceback" not in err
    assert not (tmp_path / "p").exists()
