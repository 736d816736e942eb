"""Student training: checkpoints, resume after a kill (bitwise equal weights), run-dir immutability."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from store_checks import smoke_pairs
import torch
from safetensors.torch import load_file

from pipeline import presets
from pipeline.training import train2d as train
from pipeline.errors import ArtifactExists, KDMError
from storage_schemas import StudentManifest

SETS = ["train.steps=60", "train.checkpoint_every=20", "train.threads=1"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def student_cfg(*extra):
    return presets.load("student", "smoke", sets=SETS + list(extra))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return smoke_pairs(tmp_path_factory.mktemp("data"), 1000, 250)


@pytest.fixture(scope="module")
def run_a(pairs, tmp_path_factory):
    """The uninterrupted reference run."""
    n = torch.get_num_threads()
    out = tmp_path_factory.mktemp("a") / "run"
    train.train_student(pairs, student_cfg(), str(out), progress=False)
    torch.set_num_threads(n)
    return out


def metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def assert_same_result(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "student.safetensors")), load_file(str(b / "student.safetensors"))
    assert sorted(wa) == sorted(wb)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs"
    assert (a / "student.safetensors").read_bytes() == (b / "student.safetensors").read_bytes()
    ma, mb = train.read_student_manifest(str(a)), train.read_student_manifest(str(b))
    assert mb.steps_done == 60 and mb.version == ma.version and mb.weights_sha256 == ma.weights_sha256
    assert mb.final_losses == ma.final_losses
    steps = [r["step"] for r in metrics(b)]
    assert steps == sorted(set(steps)) == [10, 20, 30, 40, 50, 60]     # strictly increasing, no duplicates
    for ra, rb in zip(metrics(a), metrics(b)):
        assert {k: v for k, v in ra.items() if k.startswith("loss_")} == \
               {k: v for k, v in rb.items() if k.startswith("loss_")}


# --- the reference run -------------------------------------------------------------------------------

def test_finished_run_layout_and_manifest(run_a, pairs):
    from pipeline.storage.pairstore import PairStore
    m = train.read_student_manifest(str(run_a))
    assert isinstance(m, StudentManifest)
    store = PairStore.open(pairs)
    assert m.steps_done == 60 and m.preset == "smoke" and m.weights_are_ema
    assert m.pairs_version == store.version and m.pairs_content_hash == store.manifest.content_hash
    assert m.teacher_id == store.manifest.teacher.id
    assert m.version == train.run_version(store.version, student_cfg())
    assert set(m.final_losses) == {"rec", "lat", "pred", "total"}
    assert m.final_losses == {k[5:]: v for k, v in metrics(run_a)[-1].items() if k.startswith("loss_")}
    from models.kdm2d import KDM2D
    assert m.trainable_parameters == train.count_parameters(KDM2D.from_config(m.model))
    cfg_json = json.loads((run_a / "config.json").read_text())
    assert cfg_json["version"] == m.version and cfg_json["pairs_version"] == store.version


def test_only_the_newest_checkpoints_are_kept(run_a, pairs, tmp_path):
    ck = run_a / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step-00000040", "step-00000060"]
    state = json.loads((ck / "step-00000060" / "state.json").read_text())
    assert state.pop("_files").keys() == {"model.safetensors", "ema.safetensors", "optimizer.pt", "rng.pt"}
    assert state == {"step": 60}
    assert {p.name for p in (ck / "step-00000060").iterdir()} == \
        {"model.safetensors", "ema.safetensors", "optimizer.pt", "rng.pt", "state.json"}
    # the EMA checkpoint of the last step is what was published
    ema = load_file(str(ck / "step-00000060" / "ema.safetensors"))
    pub = load_file(str(run_a / "student.safetensors"))
    assert all(torch.equal(ema[k], pub[k]) for k in pub)
    out = tmp_path / "keep1"
    train.train_student(pairs, student_cfg("train.keep_checkpoints=1"), str(out), progress=False)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000060"]


def test_ema_differs_from_the_raw_weights(run_a):
    ck = run_a / "checkpoints" / "step-00000060"
    raw, ema = load_file(str(ck / "model.safetensors")), load_file(str(ck / "ema.safetensors"))
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)


def test_finished_run_is_a_no_op(run_a, pairs):
    w = run_a / "student.safetensors"
    before = (w.stat().st_mtime_ns, (run_a / "manifest.json").read_bytes())
    logs = []
    v = train.train_student(pairs, student_cfg(), str(run_a), progress=False, on_log=logs.append)
    assert v == train.read_student_manifest(str(run_a)).version
    assert logs == []
    assert (w.stat().st_mtime_ns, (run_a / "manifest.json").read_bytes()) == before


# --- resume ------------------------------------------------------------------------------------------

def test_stop_after_then_resume_matches_the_uninterrupted_run(run_a, pairs, tmp_path):
    b = tmp_path / "b"
    train.train_student(pairs, student_cfg(), str(b), progress=False, stop_after=30)
    assert not (b / "manifest.json").exists() and not (b / "student.safetensors").exists()
    assert [p.name for p in (b / "checkpoints").iterdir()] == ["step-00000020"]
    assert [r["step"] for r in metrics(b)] == [10, 20, 30]   # step 30 was logged, not checkpointed
    logged = []
    train.train_student(pairs, student_cfg(), str(b), progress=False, on_log=lambda r: logged.append(r["step"]))
    assert logged == [30, 40, 50, 60]                        # resumed from step 20
    assert_same_result(run_a, b)


CHILD = """
import pathlib, sys, time
from pipeline import presets
from pipeline.training import train2d as train
pairs, out, sentinel = sys.argv[1:4]
cfg = presets.load("student", "smoke", sets={sets!r})
def on_log(rec):
    if rec["step"] == 30:
        pathlib.Path(sentinel).write_text("30")
        time.sleep(600)
train.train_student(pairs, cfg, out, progress=False, on_log=on_log)
"""


def test_sigkilled_run_resumes_to_bitwise_equal_weights(run_a, pairs, tmp_path):
    b = tmp_path / "killed"
    sentinel = tmp_path / "reached-30"
    proc = subprocess.Popen([sys.executable, "-c", CHILD.format(sets=SETS), pairs, str(b), str(sentinel)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    from kill_helpers import sigkill_when
    sigkill_when(proc, lambda: sentinel.exists() and (b / "checkpoints" / "step-00000020" / "state.json").exists(),
                 60, "trainer (killed at step 30)")
    assert not (b / "manifest.json").exists()
    assert [r["step"] for r in metrics(b)] == [10, 20, 30]
    # a kill in the middle of writing the next checkpoint leaves only its temporary directory behind
    torn = b / "checkpoints" / ".tmp-step-00000040"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"torn")

    # the same run through `kdm train`: it says where it resumed
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", "--pairs", pairs, "--preset", "smoke",
                          *[a for s in SETS for a in ("--set", s)], "--out", str(b), "-q"], cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.splitlines()[0] == f"resumed from its step-20 checkpoint in {b}"
    assert_same_result(run_a, b)
    assert sorted(p.name for p in (b / "checkpoints").iterdir()) == ["step-00000040", "step-00000060"]


def test_kill_after_the_last_checkpoint_finishes_without_retraining(run_a, pairs, tmp_path):
    b = tmp_path / "late"
    shutil.copytree(run_a, b)
    (b / "manifest.json").unlink()
    (b / "student.safetensors").unlink()
    logs = []
    train.train_student(pairs, student_cfg(), str(b), progress=False, on_log=logs.append)
    assert logs == []
    assert_same_result(run_a, b)


def test_torn_metrics_line_does_not_block_resume(run_a, pairs, tmp_path):
    b = tmp_path / "torn-metrics"
    train.train_student(pairs, student_cfg(), str(b), progress=False, stop_after=30)
    with (b / "metrics.jsonl").open("a") as f:
        f.write('{"step": 31, "loss_re')          # the kill hit in the middle of a line
    train.train_student(pairs, student_cfg(), str(b), progress=False)
    assert_same_result(run_a, b)


# --- refusals ----------------------------------------------------------------------------------------

def test_run_dir_of_another_config_is_refused(run_a, pairs, tmp_path):
    c = tmp_path / "c"
    train.train_student(pairs, student_cfg(), str(c), progress=False, stop_after=20)
    with pytest.raises(ArtifactExists) as e:
        train.train_student(pairs, student_cfg("train.lr=0.001"), str(c), progress=False)
    assert "another config" in str(e.value) and "--out" in str(e.value)
    with pytest.raises(ArtifactExists, match="immutable"):
        train.train_student(pairs, student_cfg("train.lr=0.001"), str(run_a), progress=False)


def test_run_version_ignores_device_threads_and_log_interval():
    base = student_cfg()
    same = student_cfg("train.threads=2", "train.log_every=5")
    assert train.run_version("p", base) == train.run_version("p", same)
    assert train.run_version("p", base) != train.run_version("q", base)
    assert train.run_version("p", base) != train.run_version("p", student_cfg("train.seed=1"))


def test_pairs_of_another_dimension_are_refused(pairs, tmp_path):
    with pytest.raises(KDMError, match=r"model.dim=3 expects \(3,\)"):
        train.train_student(pairs, student_cfg("model.dim=3"), str(tmp_path / "d"), progress=False)
    assert not (tmp_path / "d").exists()


def test_metrics_log_truncates_at_the_resumed_step_and_appends_rate_and_time(tmp_path):
    from pipeline.storage import checkpoints
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 2.0}\n{"step": 3, "lo')   # torn last line
    assert checkpoints.MetricsLog(path, 1, 8, write=False).record(2, {"x": 1})["step"] == 2
    assert len(path.read_text().splitlines()) == 3                     # a non-writing process leaves it alone
    with checkpoints.MetricsLog(path, 1, 8) as log:
        rec = log.record(3, {"loss_total": 0.5, "epoch": 0})
        log.write(rec)
    assert list(rec) == ["step", "loss_total", "epoch", "pairs_per_s", "elapsed_s"]
    assert rec["pairs_per_s"] > 0 and rec["elapsed_s"] >= 0
    assert [r["step"] for r in metrics(tmp_path)] == [1, 3]
