"""S3 under faults, through a fault-injecting proxy (tests/fault_proxy.py) in front of a loopback moto server:
a store that keeps a short body while answering 200, a commit cut off by a permanent error or a SIGKILL, a
connection reset mid-body after the client's retries, `kdm evaluate --out s3://...`. Each test asserts that
the final artifact verifies and what the messages say."""
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import moto.server  # noqa: F401  (test dependencies: make test installs them)
import s3fs  # noqa: F401

from fault_proxy import moto_behind_proxy
from pipeline import presets
from pipeline.cli import main
from pipeline.errors import DataCorrupt, KDMError
from pipeline.pairs import generate, importer
from pipeline.storage import artifacts
from pipeline.storage.pairstore import PairStore
from pipeline.teachers import flow_matching as teacher
from pipeline.training import train2d as train
from storage_schemas import PairsGenerateConfig, PairsImportConfig, SamplerSettings, SeedRange

BUCKET = "kdm-faults"
REPO = Path(__file__).resolve().parents[1]
SETS = ["train.steps=20", "train.checkpoint_every=10", "train.keep_checkpoints=1", "train.threads=1"]
IMPORT = PairsImportConfig(holdout_fraction=0.2, split_seed=0, chunk_size=100)


@pytest.fixture(scope="module")
def s3():
    """(s3fs through the proxy, the proxy); botocore tries a failing request twice, not five times."""
    saved = {k: os.environ.get(k) for k in ("AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE")}
    os.environ.update(AWS_MAX_ATTEMPTS="2", AWS_RETRY_MODE="standard")
    try:
        with moto_behind_proxy(BUCKET) as (fs, proxy):
            yield fs, proxy
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(autouse=True)
def no_faults_left(s3):
    yield
    s3[1].clear()


def url(*parts: str) -> str:
    return "/".join([f"s3://{BUCKET}", *parts])


def keys(fs, prefix: str) -> list[str]:
    fs.invalidate_cache()
    return sorted(p.removeprefix(f"{BUCKET}/{prefix}/") for p in fs.find(f"{BUCKET}/{prefix}"))


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """A local smoke teacher, its pairs (300 train, 100 held out) and a student trained on them."""
    root = tmp_path_factory.mktemp("local")
    t = str(root / "teacher")
    teacher.train_teacher(presets.load("teacher", "smoke"), t, progress=False)
    cfg = PairsGenerateConfig(seeds=SeedRange(start=0, stop=300), heldout_seeds=SeedRange(start=1000, stop=1100),
                              sampler=SamplerSettings(method="euler", steps=2), chunk_size=100)
    pairs = str(root / "pairs")
    generate.generate_pairs(t, cfg, pairs, progress=False)
    student = str(root / "student")
    train.train_student(pairs, presets.load("student", "smoke", sets=SETS), student, progress=False)
    return {"teacher": t, "pairs": pairs, "student": student}


@pytest.fixture(scope="module")
def traj(tmp_path_factory):
    arr = np.random.default_rng(0).normal(size=(3, 500, 2)).astype(np.float32)
    path = tmp_path_factory.mktemp("src") / "traj.npy"
    np.save(path, arr)
    return path


# --- 1. every upload is verified ----------------------------------------------------------------------

def test_a_short_body_kept_by_the_store_is_sent_again_and_never_committed(s3, local, caplog):
    fs, proxy = s3
    cfg = presets.load("student", "smoke", sets=SETS)
    out = url("students", "short")
    f = proxy.add("truncate", method="PUT", key="/students/short.partial/student.safetensors", times=1)
    with caplog.at_level("WARNING", logger="kdm.artifacts"):
        v = train.train_student(local["pairs"], cfg, out, progress=False)
    assert f.hits == 1 and "was damaged (the store holds" in caplog.text
    m = train.read_student_manifest(out)
    assert m.version == v and artifacts.sha256_file(artifacts.join(out, "student.safetensors")) == m.weights_sha256
    assert m.weights_sha256 == train.read_student_manifest(local["student"]).weights_sha256

    # a store that always keeps short bodies: the run fails, nothing is committed, and says why
    out2 = url("students", "always-short")
    proxy.add("truncate", method="PUT", key="/students/always-short.partial/student.safetensors", times=None)
    with pytest.raises(KDMError, match=r"the upload of s3://kdm-faults/students/always-short\.partial/student\."
                                       r"safetensors was damaged after 3 attempts \(the store holds \d+ of the \d+ "
                                       r"bytes written\).*then rerun"):
        train.train_student(local["pairs"], cfg, out2, progress=False)
    assert not artifacts.committed(out2)
    proxy.clear()
    resumed = []
    train.train_student(local["pairs"], cfg, out2, progress=False, on_resume=resumed.append)
    assert resumed == [20]             # the verified checkpoint of the failed run
    assert train.read_student_manifest(out2).weights_sha256 == m.weights_sha256

    # a committed artifact damaged later: the rerun's "already holds this version" re-checks it
    fs.pipe(f"{BUCKET}/students/short/student.safetensors", fs.cat(f"{BUCKET}/students/short/student.safetensors")[:100])
    with pytest.raises(DataCorrupt, match=r"s3://kdm-faults/students/short is committed as version \S+ but "
                                          r"student\.safetensors does not match the sha256 its manifest records: the "
                                          r"store holds a damaged copy; delete s3://kdm-faults/students/short"):
        train.train_student(local["pairs"], cfg, out, progress=False)


def test_a_short_checkpoint_upload_is_sent_again(s3, local):
    fs, proxy = s3
    out = url("students", "short-ckpt")
    f = proxy.add("truncate", method="PUT", key="/checkpoints/step-00000010/model.safetensors", times=1)
    train.train_student(local["pairs"], presets.load("student", "smoke", sets=SETS), out, progress=False,
                        stop_after=10)
    assert f.hits == 1
    ck = f"{BUCKET}/students/short-ckpt.partial/checkpoints/step-00000010"
    state = json.loads(fs.cat(f"{ck}/state.json"))
    for name, (size, digest) in state["_files"].items():
        assert fs.info(f"{ck}/{name}")["size"] == size, name


def test_teacher_weights_and_json_are_verified(s3):
    fs, proxy = s3
    f = proxy.add("truncate", method="PUT", key="/teachers/t.partial/weights.safetensors", times=2)
    m = teacher.train_teacher(presets.load("teacher", "smoke"), url("teachers", "t"), progress=False)
    assert f.hits == 2
    assert artifacts.sha256_file(url("teachers", "t", "weights.safetensors")) == m.weights_sha256


# --- 2. a cut-off commit is finished by the rerun ---------------------------------------------------------

def test_import_killed_during_its_commit_is_finished_by_the_rerun(s3, traj, capsys):
    """A real SIGKILL of `kdm pairs import` while it copies .partial to the final prefix."""
    fs, proxy = s3
    out = url("pairs", "killed")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "pipeline.cli", "pairs", "import", str(traj), "--format", "kdm-trajectories",
           "--holdout", "0.2", "--chunk-size", "100", "--out", out]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    f = proxy.add("call", method="PUT", key="/pairs/killed/x_T/", times=1, fn=lambda: proc.send_signal(signal.SIGKILL))
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL and f.hits == 1
    copied = keys(fs, "pairs/killed")
    assert copied and not any(k.endswith("zarr.json") for k in copied)        # data without markers
    assert "zarr.json" in keys(fs, "pairs/killed.partial")                      # the finished artifact

    rc = main(["pairs", "import", str(traj), "--format", "kdm-trajectories", "--holdout", "0.2",
               "--chunk-size", "100", "--out", out])
    stdout, stderr = capsys.readouterr()
    assert rc == 0, stderr
    store = PairStore.open(out)
    assert store.verify() > 0 and len(store) == 400 and len(store.heldout()) == 100
    assert f"imported {store.version}" in stdout
    assert keys(fs, "pairs/killed.partial") == []
    assert importer.import_pairs(str(traj), IMPORT, url("pairs", "reference")) == store.version   # uninterrupted
    assert PairStore.open(url("pairs", "reference")).manifest.content_hash == store.manifest.content_hash


def test_train_commit_cut_by_a_permanent_error_is_finished_by_the_rerun(s3, local):
    fs, proxy = s3
    cfg = presets.load("student", "smoke", sets=SETS)
    out = url("students", "cut")
    proxy.add("error500", method="PUT", key="/students/cut/manifest.json", times=None)
    with pytest.raises(KDMError, match=r"committing s3://kdm-faults/students/cut failed with a transport error: .*"
                                       r"rerun once the object store is reachable .*students/cut\.partial holds the "
                                       r"finished artifact: the rerun of the same command finishes the commit"):
        train.train_student(local["pairs"], cfg, out, progress=False)
    assert "student.safetensors" in keys(fs, "students/cut") and not artifacts.committed(out)
    proxy.clear()
    resumed = []
    v = train.train_student(local["pairs"], cfg, out, progress=False, on_resume=resumed.append)
    assert resumed == []                        # finished from .partial, not trained again
    m = train.read_student_manifest(out)
    assert m.version == v and artifacts.sha256_file(artifacts.join(out, "student.safetensors")) == m.weights_sha256
    assert keys(fs, "students/cut.partial") == []
    assert m.weights_sha256 == train.read_student_manifest(local["student"]).weights_sha256


def test_generate_commit_cut_by_a_permanent_error_is_finished_by_the_rerun(s3, local):
    fs, proxy = s3
    cfg = PairsGenerateConfig(seeds=SeedRange(start=0, stop=200), heldout_seeds=SeedRange(start=1000, stop=1050),
                              sampler=SamplerSettings(method="euler", steps=2), chunk_size=100)
    out = url("pairs", "gen-cut")
    proxy.add("error500", method="PUT", key="/pairs/gen-cut/heldout/zarr.json", copy=True, times=None)
    with pytest.raises(KDMError, match="the rerun of the same command finishes the commit"):
        generate.generate_pairs(local["teacher"], cfg, out, progress=False)
    assert any("/c/" in k for k in keys(fs, "pairs/gen-cut")) and "zarr.json" not in keys(fs, "pairs/gen-cut")
    proxy.clear()
    v = generate.generate_pairs(local["teacher"], cfg, out, progress=False)
    store = PairStore.open(out)
    assert store.version == v and store.verify() > 0 and len(store.heldout()) == 50
    assert keys(fs, "pairs/gen-cut.partial") == []


def test_foreign_data_and_an_unfinished_commit_of_another_version_are_refused_naming_what_to_delete(s3, traj):
    fs, proxy = s3
    fs.pipe(f"{BUCKET}/pairs/foreign/notes.txt", b"not kdm")
    with pytest.raises(KDMError, match=r"s3://kdm-faults/pairs/foreign holds objects but no committed kdm artifact, "
                                       r"and s3://kdm-faults/pairs/foreign\.partial holds no finished one to complete "
                                       r"it from; delete everything under s3://kdm-faults/pairs/foreign/ \(e\.g\. "
                                       r"`aws s3 rm --recursive s3://kdm-faults/pairs/foreign/`\) and rerun"):
        importer.import_pairs(str(traj), IMPORT, url("pairs", "foreign"))
    assert keys(fs, "pairs/foreign") == ["notes.txt"]

    # a commit of version A cut off; the command of another version onto the same location is refused
    out = url("pairs", "other")
    proxy.add("error500", method="PUT", key="/pairs/other/zarr.json", times=None)
    with pytest.raises(KDMError, match="rerun of the same command finishes the commit"):
        importer.import_pairs(str(traj), IMPORT, out)
    proxy.clear()
    other = IMPORT.model_copy(update={"split_seed": 1})
    with pytest.raises(KDMError, match=r"s3://kdm-faults/pairs/other holds an unfinished commit of version \S+ \(its "
                                       r"finished copy is s3://kdm-faults/pairs/other\.partial\), not \S+: rerun the "
                                       r"command that wrote \S+ to finish it, or delete both"):
        importer.import_pairs(str(traj), other, out)
    v = importer.import_pairs(str(traj), IMPORT, out)          # the same command finishes it
    assert PairStore.open(out).version == v and PairStore.open(out).verify() > 0


def test_a_flow_stage_whose_commit_was_cut_is_finished_by_its_rerun(s3, local):
    """The checkerboard evaluation stage (report.json is its marker) with an S3 root: the copy of report.json
    fails for good; the stage's rerun commits it."""
    from pipeline import stages
    from pipeline.recipes.checkerboard import Evaluation2D
    from storage_schemas import Eval2DConfig
    fs, proxy = s3
    cfg = presets.load("distill", "smoke", sets=[f"root={url('flowroot')}"]).model_copy(
        update={"evaluation": Eval2DConfig(num_samples=50, swd_projections=8, plots=True)})
    inputs = {"student": local["student"], "filter": local["pairs"]}
    proxy.add("error500", method="PUT", key="/flowroot/evaluations/", copy=True, times=None)
    with pytest.raises(KDMError, match=r"committing s3://kdm-faults/flowroot/evaluations/\S+ failed with a transport "
                                       r"error: .*the rerun of the same command finishes the commit"):
        stages.run_stage(Evaluation2D(), cfg, inputs, stages.StageContext(progress_bars=False))
    proxy.clear()
    ev = stages.run_stage(Evaluation2D(), cfg, inputs, stages.StageContext(progress_bars=False))
    rel = ev["uri"].removeprefix(f"s3://{BUCKET}/")
    assert ev["skipped"] is False and {"report.json", "samples.png"} <= set(keys(fs, rel))
    assert keys(fs, rel + ".partial") == []
    assert json.loads(fs.cat(f"{BUCKET}/{rel}/report.json"))["student_version"] == \
        train.read_student_manifest(local["student"]).version
    assert stages.run_stage(Evaluation2D(), cfg, inputs, stages.StageContext(progress_bars=False))["skipped"] is True


# --- 3. kdm evaluate --out s3://... -------------------------------------------------------------------------

def test_evaluate_writes_to_s3_and_keeps_another_students_report(s3, local, tmp_path, monkeypatch, capsys):
    fs, _ = s3
    monkeypatch.chdir(tmp_path)
    args = ["evaluate", "--student", local["student"], "--pairs", local["pairs"], "--set", "num_samples=50",
            "--set", "swd_projections=8"]
    assert main(args + ["--out", url("ev", "a", "report.json")]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip().endswith(f"-> {url('ev', 'a', 'report.json')}")
    assert list(tmp_path.iterdir()) == []                                 # no local folder named s3:
    assert {"report.json", "samples.png"} <= set(keys(fs, "ev/a"))
    report = json.loads(fs.cat(f"{BUCKET}/ev/a/report.json"))
    assert report["student_version"] == train.read_student_manifest(local["student"]).version

    assert main(args + ["--out", url("ev", "b", "named.json")]) == 0      # another name: no report.json beside it
    assert "named.json" in keys(fs, "ev/b") and "report.json" not in keys(fs, "ev/b")

    other = dict(report, student_version="another-student")
    fs.pipe(f"{BUCKET}/ev/c/report.json", json.dumps(other).encode())
    for out in (url("ev", "c"), url("ev", "c", "report.json"), url("ev", "c", "mine.json")):
        assert main(args + ["--out", out]) == 1
        err = capsys.readouterr().err
        assert f"--out {url('ev', 'c', 'report.json')} holds the report of student another-student" in err, err
        assert "choose another --out (it is kept)" in err
    assert json.loads(fs.cat(f"{BUCKET}/ev/c/report.json"))["student_version"] == "another-student"
    assert keys(fs, "ev/c") == ["report.json"]


def test_sample_writes_to_s3(s3, local, tmp_path, monkeypatch, capsys):
    fs, _ = s3
    monkeypatch.chdir(tmp_path)
    args = ["sample", "--student", local["student"], "--num", "7", "--seed", "3"]
    assert main(args + ["--out", url("samples", "a")]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip().endswith(f"to {url('samples', 'a.npy')}")
    x = np.load(io.BytesIO(fs.cat(f"{BUCKET}/samples/a.npy")))
    assert x.shape == (7, 2) and list(tmp_path.iterdir()) == []
    assert main(args + ["--out", url("samples", "a.npy")]) == 0                       # the same samples: kept
    assert "already holds these 7 one-step samples" in capsys.readouterr().out
    assert main(args[:-1] + ["4", "--out", url("samples", "a.npy")]) == 1              # other samples: refused
    assert "holds other data than these samples; choose another --out (it is kept)" in capsys.readouterr().err


# --- 4. transport errors are not damage --------------------------------------------------------------------

def test_a_reset_that_outlasts_the_retries_is_a_transport_error_and_a_bad_checksum_is_damage(s3, traj):
    fs, proxy = s3
    out = url("pairs", "reads")
    importer.import_pairs(str(traj), IMPORT, out)
    store = PairStore.open(out)
    proxy.add("reset", method="GET", key="/pairs/reads/x_0/c/1/", times=None)
    with pytest.raises(KDMError) as e:
        store.read_chunk("x_0", 1)
    msg = str(e.value)
    assert not isinstance(e.value, DataCorrupt) and "damaged" not in msg.replace("not found damaged", "")
    assert msg.startswith("reading s3://kdm-faults/pairs/reads: array 'x_0', chunk 1 (rows 100-199, file x_0/c/1/0) "
                          "failed with a transport error: ")
    assert msg.endswith("the stored data was not found damaged: rerun once the object store is reachable "
                        "(finished work is kept)")
    cause = msg.split("transport error: ", 1)[1].split("; the stored data", 1)[0]
    assert len(cause) <= 160 and (cause.endswith(" ...") or not cause.endswith(("-", "'")))
    proxy.clear()

    proxy.add("reset", method="GET", key="/weights.safetensors", times=None)
    fs.pipe(f"{BUCKET}/w/weights.safetensors", b"x" * 4096)
    with pytest.raises(KDMError, match=r"^reading s3://kdm-faults/w/weights\.safetensors failed with a transport "
                                       r"error: .*rerun once the object store is reachable"):
        artifacts.read_verified(url("w", "weights.safetensors"), "0" * 64, "teacher")
    proxy.clear()

    key = f"{BUCKET}/pairs/reads/x_0/c/1/0"
    raw = bytearray(fs.cat(key))
    raw[len(raw) // 2] ^= 0xFF
    fs.pipe(key, bytes(raw))
    with pytest.raises(DataCorrupt, match=r"chunk 1 .* cannot be read \(its crc32c checksum does not match.*the pair "
                                          r"store is damaged"):
        PairStore.open(out).read_chunk("x_0", 1)


def test_the_proxy_answers_s3_errors_and_adds_latency(s3):
    fs, proxy = s3
    fs.pipe(f"{BUCKET}/p/x", b"payload")
    proxy.add("slowdown", method="GET", key="/p/x", times=1)           # retried by the client
    assert artifacts.read_bytes(url("p", "x")) == b"payload"
    proxy.add("latency", method="GET", key="/p/x", times=1, seconds=0.3)
    t = time.monotonic()
    assert artifacts.read_bytes(url("p", "x")) == b"payload"
    assert time.monotonic() - t >= 0.3
    proxy.add("error500", method="GET", key="/p/x", times=None)
    with pytest.raises(KDMError, match=r"reading s3://kdm-faults/p/x failed with a transport error: .*internal "
                                       r"error.*rerun"):
        artifacts.read_bytes(url("p", "x"))
    proxy.clear()
    proxy.add("error500", method="PUT", key="/p/y", times=None)
    with pytest.raises(KDMError, match=r"writing s3://kdm-faults/p/y failed with a transport error: .*internal "
                                       r"error.*rerun"):
        artifacts.write_bytes(url("p", "y"), b"data")


def test_import_is_unchanged_by_slowdowns_and_resets(s3, traj):
    fs, proxy = s3
    # each fault hits one request once (the client tries a request twice here): a chunk upload, a metadata
    # read, a copy of the commit, and a chunk read back when the store is finalized
    proxy.add("slowdown", method="PUT", key="/pairs/noisy.partial/x_0/c/1/", times=1)
    proxy.add("slowdown", method="GET", key="/pairs/noisy.partial/label/zarr.json", times=1)
    proxy.add("error500", method="PUT", key="/pairs/noisy/seed/c/0", times=1)
    proxy.add("reset", method="GET", key="/pairs/noisy.partial/x_T/c/2/", times=1)
    v = importer.import_pairs(str(traj), IMPORT, url("pairs", "noisy"))
    assert [f.hits for f in proxy.faults] == [1, 1, 1, 1]
    proxy.clear()
    assert v == importer.import_pairs(str(traj), IMPORT, url("pairs", "quiet"))
    assert PairStore.open(url("pairs", "noisy")).manifest.content_hash == \
        PairStore.open(url("pairs", "quiet")).manifest.content_hash
