"""Image pair generation from EDM teachers: EDM Heun pairs, labels from seeds, sharded workers, kill/resume."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from pydantic import ValidationError

from image_fixtures import image_folder, single_thread, write_archive
from models.samplers import edm_heun, edm_latents, edm_levels, integrate_ode, seeded_noise
from pipeline.storage import artifacts
from pipeline.pairs import generate
from pipeline import presets
from pipeline.teachers import flow_matching as teacher
from pipeline.data.datasets import prepare_image_dataset
from pipeline.errors import KDMError
from pipeline.storage.pairstore import PairStore
from pipeline.teachers.flow_matching import load_denoiser
from pipeline.teachers.bootstrap import load_edm_teacher_config, train_edm_teacher
from storage_schemas import PairsGenerateConfig, PairStoreManifest, SamplerSettings, SeedRange
from store_checks import assert_same_store

REPO = Path(__file__).resolve().parents[1]
TRAIN, HELD, CHUNK = (0, 48), (48, 64), 8          # 6 train shards + 2 held-out shards


pytestmark = pytest.mark.usefixtures("one_thread")


def edm_cfg(train=TRAIN, held=HELD, chunk=CHUNK, steps=3, **sampler) -> PairsGenerateConfig:
    return PairsGenerateConfig(seeds=SeedRange(start=train[0], stop=train[1]),
                               heldout_seeds=SeedRange(start=held[0], stop=held[1]) if held else None,
                               sampler=SamplerSettings(kind="edm-heun", steps=steps, **sampler), chunk_size=chunk)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Tiny EDM teachers bootstrapped on CPU: conditional (3 classes) and unconditional."""
    root = tmp_path_factory.mktemp("teachers")
    members, _ = image_folder(np.random.default_rng(0), per_class={"train": 4, "test": 1})
    ds = str(root / "ds")
    prepare_image_dataset(str(write_archive(root / "a.tgz", members)), ds, progress=False)
    sets = ["unet.model_channels=8", "unet.channel_mult=[1,2]", "unet.num_blocks=1", "unet.attn_resolutions=[4]",
            "batch_size=8", "steps=2", "preview_samples=0", "device=cpu", "lr_rampup_images=8"]
    out = {}
    with single_thread():
        for name, labels in (("cond", "true"), ("uncond", "false")):
            cfg = load_edm_teacher_config("cifar10-mini", sets=sets + [f"use_labels={labels}"])
            train_edm_teacher(ds, cfg, str(root / name), progress=False)
            out[name] = str(root / name)
    return out


@pytest.fixture(scope="module")
def reference(teachers, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref") / "pairs")
    with single_thread():
        version = generate.generate_pairs(teachers["cond"], edm_cfg(), out, progress=False)
    return out, version


# --- content -----------------------------------------------------------------------------------------

def test_pairs_are_edm_heun_from_seeded_latents_and_labels(teachers, reference):
    out, version = reference
    s = PairStore.open(out)
    d = s.load()
    seeds = list(range(*TRAIN))
    eps, ids = edm_latents(seeds, (3, 8, 8), label_dim=3)
    assert np.array_equal(d["x_T"], (80 * eps).numpy())                   # x_T = sigma_max * eps, stored
    assert np.array_equal(d["label"], ids.numpy().astype(np.int32))        # labels drawn from the seed
    assert set(d["label"].tolist()) <= {0, 1, 2} and np.array_equal(d["seed"], np.arange(*TRAIN))
    net, _ = load_denoiser(teachers["cond"])
    x0 = edm_heun(net, torch.from_numpy(d["x_T"][:8]), torch.eye(3)[ids[:8]], num_steps=3)
    assert np.allclose(d["x_0"][:8], x0.float().numpy(), atol=1e-6)
    assert not np.allclose(d["x_0"], d["x_T"])


def test_manifest_records_the_sampler_and_scaling(teachers, reference):
    out, version = reference
    g = zarr.open_group(out, mode="r")
    man = PairStoreManifest.model_validate(g.attrs["kdm"])
    tm = teacher.read_teacher_manifest(teachers["cond"])
    assert man.version == version and man.origin == "teacher" and man.split == "train"
    assert man.sampler.kind == "edm-heun" and man.sampler.method == "heun" and man.sampler.steps == 3
    assert man.sampler.nfe == 5 and man.sampler.sigma_min == 0.002 and man.sampler.rho == 7.0
    assert man.x_T_scale == 80.0 and man.sampler.noise_scale == 80.0
    assert man.num_classes == 3 and man.sample_shape == (3, 8, 8)
    assert man.teacher.id == tm.id and man.teacher.kind == "edm" and man.teacher.sha256 == tm.weights_sha256
    assert g["x_0"].chunks == (CHUNK, 3, 8, 8)
    held = PairStore.open(out).heldout()
    assert held.manifest.version == f"{version}-heldout" and len(held) == 16
    assert not Path(artifacts.partial_url(out)).exists()
    assert not (Path(out) / generate.PROGRESS_DIR).exists()


def test_edm_heun_snapshots_are_kept_at_their_noise_levels(teachers, reference, tmp_path):
    """K = 2 states of each EDM Heun trajectory (after steps 1 and 2 of 3) beside x_T and x_0, verified on read."""
    out = str(tmp_path / "snap")
    generate.generate_pairs(teachers["cond"], edm_cfg(snapshot_steps=(1, 2)), out, progress=False)
    s = PairStore.open(out)
    net, _ = load_denoiser(teachers["cond"])
    levels = edm_levels(net, 3)
    snap = s.manifest.snapshots
    assert (snap.axis, snap.x_T_level, snap.levels, snap.solver_steps) == ("edm-sigma", 80.0, tuple(levels[1:3]),
                                                                         (1, 2))
    assert levels[0] > snap.levels[0] > snap.levels[1] > 0 and s.manifest.schema_version == 2
    d = s.load(s.pair_arrays)
    ref = PairStore.open(reference[0]).load()
    assert np.array_equal(d["x_0"], ref["x_0"]) and np.array_equal(d["x_T"], ref["x_T"])   # the same pairs
    assert d["x_t"].shape == (48, 2, 3, 8, 8) and d["x_t"].dtype == np.float32
    x0, kept = edm_heun(net, torch.from_numpy(d["x_T"][:8]), torch.eye(3)[torch.from_numpy(d["label"][:8]).long()],
                        num_steps=3, keep=(1, 2))
    assert np.allclose(d["x_t"][:8], kept.float().numpy(), atol=1e-6)
    assert s.verify() == 5 * 6 + 5 * 2 and s.heldout().manifest.snapshots == snap
    # storage per pair grows by K images: each snapshot costs about what x_T does
    sizes = {k: sum(f.stat().st_size for f in (Path(out) / k).rglob("*") if f.is_file()) for k in ("x_T", "x_t")}
    assert 1.5 < sizes["x_t"] / sizes["x_T"] < 2.5


def test_unconditional_teacher_labels_are_minus_one(teachers, tmp_path):
    out = str(tmp_path / "u")
    generate.generate_pairs(teachers["uncond"], edm_cfg(train=(0, 10), held=None, chunk=5), out, progress=False)
    s = PairStore.open(out)
    assert np.all(s.group["label"][:] == -1) and s.manifest.num_classes == 0
    assert np.array_equal(s.group["x_T"][:], (80 * seeded_noise(range(10), (3, 8, 8))).numpy())


def test_a_pair_depends_only_on_its_seed(teachers, reference, tmp_path):
    ref = PairStore.open(reference[0]).load()
    out = str(tmp_path / "sub")
    generate.generate_pairs(teachers["cond"], edm_cfg(train=(13, 40), held=None, chunk=5), out, progress=False,
                            batch_size=3)
    sub = PairStore.open(out).load()
    assert np.array_equal(sub["x_T"], ref["x_T"][13:40]) and np.array_equal(sub["label"], ref["label"][13:40])
    assert np.allclose(sub["x_0"], ref["x_0"][13:40], atol=1e-5)


def test_batch_size_and_workers_do_not_enter_the_version(teachers):
    cfg = edm_cfg()
    assert generate.pairs_version("t", cfg) != generate.pairs_version("t", edm_cfg(steps=4))
    assert generate.pairs_version("t", cfg) == generate.pairs_version("t", cfg.model_copy(update={"device": "cuda"}))


def test_sampler_settings_validation():
    s = SamplerSettings(kind="edm-heun")
    assert (s.steps, s.noise_scale, s.sigma_min, s.rho, s.nfe) == (18, 80.0, 0.002, 7.0, 35)
    assert SamplerSettings(kind="edm-heun", steps=40).nfe == 79
    assert "sigma_min" not in SamplerSettings().model_dump()          # flow-matching dumps are unchanged
    with pytest.raises(ValidationError, match="Heun"):
        SamplerSettings(kind="edm-heun", method="euler")
    with pytest.raises(ValidationError, match="edm-heun"):
        SamplerSettings(method="euler", rho=7)


def test_fast_path_precision_is_part_of_the_version_and_close_to_the_reference(teachers, reference, tmp_path):
    out, version = reference
    assert "precision" not in edm_cfg().sampler.model_dump()              # reference stores keep their versions
    with pytest.raises(ValidationError, match="'edm-heun' only"):
        SamplerSettings(precision="bf16")
    fast = edm_cfg(precision="bf16")
    v = generate.generate_pairs(teachers["cond"], fast, str(tmp_path / "fast"), progress=False)
    assert v != version and PairStore.open(str(tmp_path / "fast")).manifest.sampler.precision == "bf16"
    a, b = PairStore.open(out).load(), PairStore.open(str(tmp_path / "fast")).load()
    assert np.array_equal(a["x_T"], b["x_T"]) and np.array_equal(a["label"], b["label"])
    drift = np.abs(a["x_0"] - b["x_0"])
    assert 0 < drift.mean() < 0.05                                          # reduced precision: close, not equal


def test_edm_teacher_with_an_ode_sampler_is_an_error(teachers, tmp_path):
    cfg = PairsGenerateConfig(seeds=SeedRange(start=0, stop=4), heldout_seeds=None, chunk_size=4)
    with pytest.raises(KDMError, match="edm-heun"):
        generate.generate_pairs(teachers["cond"], cfg, str(tmp_path / "x"), progress=False)


def test_flow_matching_teacher_through_edm_heun(tmp_path):
    """The pipeline is denoiser-agnostic: the 2-D flow-matching teacher sampled with EDM's Heun."""
    t = str(tmp_path / "fm")
    teacher.train_teacher(presets.load("teacher", "smoke"), t, progress=False)
    out = str(tmp_path / "pairs")
    generate.generate_pairs(t, edm_cfg(train=(0, 64), held=None, chunk=32, steps=40), out, progress=False)
    d = PairStore.open(out).load()
    assert d["x_T"].shape == (64, 2) and np.array_equal(d["x_T"], (80 * seeded_noise(range(64), (2,))).numpy())
    velocity, _ = teacher.load_teacher(t)
    ode = integrate_ode(velocity, torch.from_numpy(d["x_T"]) / 81, 400, "heun", t0=1 / 81).numpy()
    assert np.abs(d["x_0"] - ode).max() < 0.05


# --- workers -----------------------------------------------------------------------------------------

def test_resolve_workers_and_shard_plan(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert generate.resolve_workers() == (0, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert generate.resolve_workers() == (2, 3) and generate.resolve_workers(0, 1) == (0, 1)
    with pytest.raises(KDMError, match="not in"):
        generate.resolve_workers(3, 3)
    splits = [generate.Split("train", "a", SeedRange(start=0, stop=50)),
              generate.Split("heldout", "b", SeedRange(start=50, stop=62))]
    shards = generate.plan_shards(splits, 8)
    assert [(s.split.name, s.index, s.lo, s.hi) for s in shards][-3:] == [("train", 6, 48, 50), ("heldout", 0, 50, 58),
                                                                          ("heldout", 1, 58, 62)]
    mine = [[s.number for s in shards if s.number % 3 == r] for r in range(3)]
    assert sorted(sum(mine, [])) == list(range(len(shards)))


DRIVER = """
import sys, time
import torch
torch.set_num_threads(1)
from pipeline.pairs import generate
from storage_schemas import PairsGenerateConfig
teacher, cfg, out, delay = sys.argv[1], PairsGenerateConfig.model_validate_json(sys.argv[2]), sys.argv[3], float(sys.argv[4])
generate.generate_pairs(teacher, cfg, out, progress=False, on_shard=lambda i, n: time.sleep(delay), poll_s=0.05,
                        wait_timeout_s=120)
"""


def driver(teacher_url: str, cfg: PairsGenerateConfig, out: str, delay: float = 0.0, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, teacher_url, cfg.model_dump_json(), out, str(delay)],
                            cwd=str(REPO), env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def markers(out: str) -> list[Path]:
    """The shard markers so far; the running writer creates and renames folders under the walk, so a walk
    that meets a folder that has just gone is repeated."""
    while True:
        try:
            return list(Path(artifacts.partial_url(out)).rglob("shard-*.done"))
        except FileNotFoundError:
            time.sleep(0.01)


def test_sigkill_mid_run_then_the_same_command_is_byte_identical(teachers, reference, tmp_path):
    out = str(tmp_path / "killed")
    p = driver(teachers["cond"], edm_cfg(), out, delay=0.4)
    t0 = time.time()
    while len(markers(out)) < 2:
        assert p.poll() is None, p.stderr.read().decode()
        assert time.time() - t0 < 120, "the worker never finished a shard"
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    done = len(markers(out))
    assert 2 <= done < 8 and not Path(out).exists() and Path(artifacts.partial_url(out)).is_dir()
    again = driver(teachers["cond"], edm_cfg(), out)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err.decode()
    assert_same_store(reference[0], out)


def test_two_worker_processes_fill_the_same_store_as_one(teachers, reference, tmp_path):
    out = str(tmp_path / "two")
    procs = [driver(teachers["cond"], edm_cfg(), out, RANK=str(r), WORLD_SIZE="2") for r in (1, 0)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
    assert_same_store(reference[0], out)


def test_workers_in_sequence_with_explicit_ranks(teachers, reference, tmp_path):
    """Rank 1 alone waits for rank 0's layout; run rank 0 first without waiting, then rank 1, then rank 0."""
    out = str(tmp_path / "seq")
    with pytest.raises(KDMError, match="timed out"):
        generate.generate_pairs(teachers["cond"], edm_cfg(), out, progress=False, rank=1, world_size=2, poll_s=0.01,
                                wait_timeout_s=0.05)
    with pytest.raises(KDMError, match="other workers"):
        generate.generate_pairs(teachers["cond"], edm_cfg(), out, progress=False, rank=0, world_size=2, poll_s=0.01,
                                wait_timeout_s=0.05)
    assert len(markers(out)) == 4                        # rank 0's shards (numbers 0, 2, 4, 6)
    generate.generate_pairs(teachers["cond"], edm_cfg(), out, progress=False, rank=1, world_size=2)
    assert not Path(out).exists()                        # only rank 0 commits
    calls = []
    generate.generate_pairs(teachers["cond"], edm_cfg(), out, progress=False, rank=0, world_size=2,
                            on_shard=lambda i, n: calls.append(i))
    assert calls == []                                   # nothing left to compute
    assert_same_store(reference[0], out)


def test_kill_between_manifest_and_rename_only_renames(teachers, reference, tmp_path):
    import shutil
    out = str(tmp_path / "late")
    shutil.copytree(reference[0], artifacts.partial_url(out))
    (Path(artifacts.partial_url(out)) / generate.PROGRESS_DIR).mkdir()
    (Path(artifacts.partial_url(out)) / generate.PROGRESS_DIR / "shard-000000.done").write_bytes(b"")
    calls = []
    assert generate.generate_pairs(teachers["cond"], edm_cfg(), out, progress=False,
                                   on_shard=lambda i, n: calls.append(i)) == reference[1]
    assert calls == [] and not Path(artifacts.partial_url(out)).exists()
    assert_same_store(reference[0], out)


def test_cli_precision_option_changes_the_version(teachers, capsys, tmp_path, monkeypatch):
    from pipeline.cli import main
    monkeypatch.chdir(tmp_path)                  # the dry run's relative --out must not appear here
    common = ["pairs", "generate-images", "--teacher", teachers["uncond"], "--seeds", "0-15", "--device", "cpu",
              "--out", "unused", "--dry-run"]
    versions = {}
    for prec in ("fp32", "fp16"):
        assert main(common + ["--precision", prec]) in (0, None)
        versions[prec] = capsys.readouterr().out.split("version ")[1].split(",")[0]
    cfg = edm_cfg(train=(0, 16), held=None, chunk=2500, steps=18)
    tid = teacher.read_teacher_manifest(teachers["uncond"]).id
    assert versions["fp32"] == generate.pairs_version(tid, cfg)
    assert versions["fp16"] == generate.pairs_version(tid, edm_cfg(train=(0, 16), held=None, chunk=2500, steps=18,
                                                                    precision="fp16")) != versions["fp32"]
    assert list(tmp_path.iterdir()) == []
