"""Student runs at s3:// URLs: checkpoints mirrored to ``<url>.partial``, pruned, resumed from the newest
complete one (a torn upload is ignored), committed with the manifest last."""
import json

import pytest
from store_checks import smoke_pairs
import torch

import s3fs  # noqa: E402,F401  (a dependency: a missing one is an error, not a skip)
import moto.server  # noqa: E402,F401  (installed by make test)

from pipeline.storage import artifacts
from pipeline import presets
from pipeline.training import train2d as train
from pipeline.storage.run_mirror import RunMirror  # noqa: E402
from s3_server import moto_s3  # noqa: E402

BUCKET = "kdm-runs"
SETS = ["train.steps=40", "train.checkpoint_every=10", "train.keep_checkpoints=1", "train.threads=1"]


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def s3():
    with moto_s3(BUCKET) as fs:
        yield fs


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return smoke_pairs(tmp_path_factory.mktemp("data"), 600, 300)


def names(s3, path: str) -> list[str]:
    s3.invalidate_cache()
    return sorted(p.rsplit("/", 1)[-1] for p in s3.ls(path, detail=False)) if s3.exists(path) else []


def test_interrupted_s3_run_resumes_from_the_newest_complete_remote_checkpoint(s3, pairs, tmp_path):
    cfg = presets.load("student", "smoke", sets=SETS)
    out = f"s3://{BUCKET}/students/a"
    partial = f"{BUCKET}/students/a.partial"
    train.train_student(pairs, cfg, out, progress=False, stop_after=30)
    assert not artifacts.committed(out)
    assert names(s3, f"{partial}/checkpoints") == ["step-00000030"]              # keep_checkpoints=1
    assert names(s3, f"{partial}/checkpoints/step-00000030") == [
        "ema.safetensors", "model.safetensors", "optimizer.pt", "rng.pt", "state.json"]
    remote_log = [json.loads(ln) for ln in s3.cat(f"{partial}/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in remote_log] == [10, 20, 30]
    assert json.loads(s3.cat(f"{partial}/config.json"))["version"] == train.run_version(
        json.loads(s3.cat(f"{partial}/config.json"))["pairs_version"], cfg)

    # a checkpoint whose upload was cut before state.json is not complete: it is ignored
    s3.pipe(f"{partial}/checkpoints/step-00000040/model.safetensors", b"torn")
    assert RunMirror(out).complete_checkpoints() == ["step-00000030"]

    resumed = []
    train.train_student(pairs, cfg, out, progress=False, on_resume=resumed.append)
    assert resumed == [30]
    assert artifacts.committed(out) and not s3.exists(partial)
    final = f"{BUCKET}/students/a"
    assert names(s3, f"{final}/checkpoints") == ["step-00000040"]
    assert {"config.json", "metrics.jsonl", "student.safetensors", "manifest.json"} <= set(names(s3, final))
    log = [json.loads(ln) for ln in s3.cat(f"{final}/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in log] == [10, 20, 30, 40]

    local = tmp_path / "uninterrupted"
    train.train_student(pairs, cfg, str(local), progress=False)
    m_s3, m_local = train.read_student_manifest(out), train.read_student_manifest(str(local))
    assert m_s3.version == m_local.version and m_s3.steps_done == 40
    assert m_s3.weights_sha256 == m_local.weights_sha256                          # bitwise the same run
    assert s3.cat(f"{final}/student.safetensors") == (local / "student.safetensors").read_bytes()
    assert m_s3.final_losses == m_local.final_losses

    before = s3.find(final, detail=True)
    assert train.train_student(pairs, cfg, out, progress=False) == m_s3.version   # finished: a no-op
    s3.invalidate_cache()
    assert s3.find(final, detail=True) == before


def test_remote_run_of_another_config_is_refused(s3, pairs):
    cfg = presets.load("student", "smoke", sets=SETS)
    out = f"s3://{BUCKET}/students/b"
    train.train_student(pairs, cfg, out, progress=False, stop_after=10)
    other = presets.load("student", "smoke", sets=SETS + ["train.lr=0.001"])
    from pipeline.errors import ArtifactExists
    with pytest.raises(ArtifactExists, match="holds a run of another config/pairs"):
        train.train_student(pairs, other, out, progress=False)


def test_damaged_newest_remote_checkpoint_is_set_aside(s3, pairs, tmp_path, caplog):
    cfg = presets.load("student", "smoke", sets=SETS[:2] + ["train.keep_checkpoints=2", "train.threads=1"])
    out = f"s3://{BUCKET}/students/c"
    partial = f"{BUCKET}/students/c.partial"
    train.train_student(pairs, cfg, out, progress=False, stop_after=30)
    assert names(s3, f"{partial}/checkpoints") == ["step-00000020", "step-00000030"]
    ema = f"{partial}/checkpoints/step-00000030/ema.safetensors"
    s3.pipe(ema, s3.cat(ema)[:64])                                       # truncated in the bucket
    resumed = []
    with caplog.at_level("WARNING", logger="kdm.checkpoints"):
        train.train_student(pairs, cfg, out, progress=False, on_resume=resumed.append)
    assert "step-00000030 is damaged" in caplog.text
    assert resumed == [20]
    local = tmp_path / "uninterrupted"
    train.train_student(pairs, cfg, str(local), progress=False)
    assert train.read_student_manifest(out).weights_sha256 == train.read_student_manifest(str(local)).weights_sha256
