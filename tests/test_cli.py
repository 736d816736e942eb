"""The ``kdm`` command line: help, error messages, exit codes and a full smoke chain."""
import json
from pathlib import Path

import numpy as np
import pytest

from models.samplers import seeded_noise
from pipeline.cli import main
from pipeline.storage.pairstore import PairStore
from storage_schemas import EvaluationReport


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# --- help and argument errors ------------------------------------------------------------------------

def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("teacher", "pairs", "train", "sample", "evaluate", "distill"):
        assert cmd in out
    assert "kdm distill --recipe checkerboard --preset checkerboard" in out   # the examples epilog
    assert "kdm distill --recipe cifar10 --preset smoke" in out


def test_subcommand_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["pairs", "generate", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--seeds" in out and "--heldout-seeds" in out and "START-END" in out


def test_data_is_an_alias_of_dataset(capsys):
    for group in ("dataset", "data"):
        with pytest.raises(SystemExit) as e:
            main([group, "prepare", "--help"])
        assert e.value.code == 0
        assert "usage: kdm dataset prepare" in capsys.readouterr().out


def test_no_command_prints_help_and_fails(capsys):
    code, out, _ = run(capsys)
    assert code == 2 and "COMMAND" in out


def test_train_on_a_missing_store(capsys, tmp_path):
    code, out, err = run(capsys, "train", "--pairs", "/nonexistent", "--preset", "checkerboard",
                         "--out", tmp_path / "run")
    assert code != 0
    assert "no pair store" in err and "/nonexistent" in err
    assert err.startswith("kdm train: error:")
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_reversed_seed_range(capsys, tmp_path):
    code, _, err = run(capsys, "pairs", "generate", "--teacher", tmp_path / "t", "--seeds", "10-5",
                       "--out", tmp_path / "p")
    assert code != 0
    assert "END must be >= START" in err and "'10-5'" in err
    assert not (tmp_path / "p").exists()


def test_malformed_seed_range(capsys, tmp_path):
    code, _, err = run(capsys, "pairs", "generate", "--teacher", tmp_path / "t", "--seeds", "0:9",
                       "--out", tmp_path / "p")
    assert code != 0 and "START-END" in err


def test_invalid_set_names_the_field(capsys, tmp_path):
    code, _, err = run(capsys, "train", "--pairs", "/nonexistent", "--preset", "smoke", "--set", "train.lr=-1",
                       "--out", tmp_path / "run")
    assert code != 0
    assert "train.lr" in err and "greater than 0" in err
    assert "no pair store" not in err        # the config is checked before anything is read


def test_train_needs_a_preset_or_config(capsys, tmp_path):
    code, _, err = run(capsys, "train", "--pairs", "/nonexistent", "--out", tmp_path / "run")
    assert code != 0
    assert "--preset NAME or --config FILE" in err and "smoke" in err and "checkerboard" in err


def test_unknown_preset(capsys, tmp_path):
    code, _, err = run(capsys, "teacher", "train", "--preset", "nope", "--out", tmp_path / "t")
    assert code != 0 and "unknown teacher preset 'nope'" in err and "smoke" in err


def test_model_info(capsys):
    code, out, _ = run(capsys, "model", "info", "--preset", "cifar10-uncond")
    assert code == 0
    assert "trainable_parameters: 47476165" in out.splitlines()
    code, _, err = run(capsys, "model", "info", "--preset", "cifar11")
    assert code != 0 and "cifar10-uncond" in err


def test_presets_command(capsys):
    code, out, _ = run(capsys, "presets")
    assert code == 0
    assert ("student: checkerboard, checkerboard-f, checkerboard-import, checkerboard-import-multistep, "
            "checkerboard-multistep, checkerboard-official, smoke") in out


# --- the smoke chain ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    paths = {k: root / k for k in ("teacher", "pairs", "student")}
    assert main(["teacher", "train", "--preset", "smoke", "--out", str(paths["teacher"]), "-q"]) == 0
    assert main(["pairs", "generate", "--teacher", str(paths["teacher"]), "--seeds", "0-599",
                 "--heldout-seeds", "600-799", "--method", "euler", "--steps", "4", "--chunk-size", "250",
                 "--out", str(paths["pairs"]), "-q"]) == 0
    assert main(["train", "--pairs", str(paths["pairs"]), "--preset", "smoke", "--out", str(paths["student"]),
                 "-q"]) == 0
    paths["root"] = root
    return paths


def test_chain_artifacts(chain):
    assert (chain["teacher"] / "manifest.json").exists()
    s = PairStore.open(str(chain["pairs"]))
    assert len(s) == 600 and len(s.heldout()) == 200
    assert s.manifest.sampler.method == "euler" and s.manifest.sampler.steps == 4 and s.manifest.chunk_size == 250
    m = json.loads((chain["student"] / "manifest.json").read_text())
    assert m["steps_done"] == 40 and m["preset"] == "smoke" and m["pairs_version"] == s.version


def test_sample_from_a_noise_file_and_from_seeds(chain, capsys, tmp_path):
    noise = tmp_path / "xT.npy"
    np.save(noise, seeded_noise(range(7, 57), (2,)).numpy())
    code, out, _ = run(capsys, "sample", "--student", chain["student"], "--noise", noise,
                       "--out", tmp_path / "a" / "x0.npy")
    assert code == 0 and "(50, 2)" in out
    a = np.load(tmp_path / "a" / "x0.npy")
    assert a.shape == (50, 2) and a.dtype == np.float32 and np.isfinite(a).all()
    code, _, _ = run(capsys, "sample", "--student", chain["student"], "--num", 50, "--seed", 7,
                     "--out", tmp_path / "b.npy")
    assert code == 0
    assert np.array_equal(np.load(tmp_path / "b.npy"), a)   # seeds 7..56 are the same x_T


def test_sample_needs_noise_or_num_and_seed(chain, capsys, tmp_path):
    for extra in ([], ["--num", "5"], ["--seed", "3"]):
        code, _, err = run(capsys, "sample", "--student", chain["student"], *extra, "--out", tmp_path / "x.npy")
        assert code != 0
        assert "--noise FILE.npy" in err and "--num N and --seed S" in err
    assert not (tmp_path / "x.npy").exists()


def test_sample_rejects_noise_of_the_wrong_shape(chain, capsys, tmp_path):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((4, 3), np.float32))
    code, _, err = run(capsys, "sample", "--student", chain["student"], "--noise", bad, "--out", tmp_path / "x.npy")
    assert code != 0 and "expected (N, 2)" in err


def test_evaluate_writes_a_valid_report(chain, capsys, tmp_path):
    out = tmp_path / "eval" / "report.json"
    code, stdout, _ = run(capsys, "evaluate", "--student", chain["student"], "--pairs", chain["pairs"],
                          "--set", "num_samples=100", "--out", out)
    assert code == 0
    rep = EvaluationReport.model_validate(json.loads(out.read_text()))
    for ms in (rep.student, rep.teacher_reference):
        assert 0.0 <= ms.in_cell_fraction <= 1.0
        assert 0.0 <= ms.outlier_rate <= 1.0
        assert ms.swd >= 0 and ms.num_points == 100
    assert rep.protocol.num_samples == 100
    assert rep.teacher_reference.pair_mse == 0.0 and rep.student.pair_mse > 0
    # the pair MSE's standard error over the 100 held-out pairs; none for the teacher's own x_0
    assert 0 < rep.student.pair_mse_stderr < rep.student.pair_mse and rep.teacher_reference.pair_mse_stderr is None
    assert f"pair MSE {rep.student.pair_mse:.3g} ± {rep.student.pair_mse_stderr:.2g}" in stdout
    assert (rep.sample_seeds.start, len(rep.sample_seeds)) == (1_000_000, 100)
    assert rep.pairs_version == PairStore.open(str(chain["pairs"])).version
    assert rep.heldout_version == rep.pairs_version + "-heldout"
    for f in rep.plots.values():
        assert (out.parent / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "student (1 NFE)" in stdout and "teacher x_0" in stdout
    code, stdout, _ = run(capsys, "report", "--report", out)
    assert code == 0 and "student (1 NFE)" in stdout


def test_evaluate_with_too_few_samples_is_refused(chain, capsys, tmp_path):
    code, _, err = run(capsys, "evaluate", "--student", chain["student"], "--pairs", chain["pairs"],
                       "--set", "num_samples=5", "--out", tmp_path / "r.json")
    assert code != 0 and "num_samples" in err


def test_pairs_generate_dry_run_writes_nothing(chain, capsys, tmp_path):
    out = tmp_path / "dry"
    code, stdout, _ = run(capsys, "pairs", "generate", "--teacher", chain["teacher"], "--seeds", "0-99",
                          "--heldout-seeds", "100-149", "--out", out, "--dry-run")
    assert code == 0
    assert "dry run" in stdout and "100 pairs" in stdout and "+50 held out" in stdout and "40 NFE" in stdout
    assert not out.exists() and not Path(str(out) + ".partial").exists()
    assert list(tmp_path.iterdir()) == []


def test_pairs_info_verifies(chain, capsys):
    code, out, _ = run(capsys, "pairs", "info", chain["pairs"], "--verify")
    assert code == 0 and "chunks verified (train and held out)" in out and "held out 200" in out


def test_rerunning_a_stage_is_a_no_op(chain, capsys):
    before = (chain["student"] / "manifest.json").read_bytes()
    code, out, _ = run(capsys, "train", "--pairs", chain["pairs"], "--preset", "smoke", "--out", chain["student"], "-q")
    assert code == 0 and "40 steps" in out
    assert (chain["student"] / "manifest.json").read_bytes() == before
    code, _, err = run(capsys, "train", "--pairs", chain["pairs"], "--preset", "smoke", "--set", "train.steps=41",
                       "--out", chain["student"], "-q")
    assert code != 0 and "artifacts are immutable" in err


# --- --dry-run: validates, prints the plan (the version the real run writes), writes nothing ----------

def tree(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``roots`` with its size and modification time."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for r in roots for p in [r, *r.rglob("*")]}


def plan_json(out: str) -> dict:
    """The config a dry run prints after its first line."""
    return json.loads(out[out.index("\n{") + 1:out.rindex("}") + 1])


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch):
    """An empty working directory: a dry run's relative --out must not appear in it."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def test_teacher_train_dry_run_prints_the_plan_and_writes_nothing(chain, capsys, empty_cwd):
    from pipeline import presets
    from pipeline.teachers.flow_matching import read_teacher_manifest, teacher_version
    before = tree(chain["root"])
    code, out, err = run(capsys, "teacher", "train", "--preset", "smoke", "--set", "steps=7", "--out",
                         "runs/teacher", "--dry-run")
    assert code == 0, err
    cfg = presets.load("teacher", "smoke", sets=["steps=7"])
    assert out.splitlines()[0] == f"dry run: would train teacher {teacher_version(cfg)} -> runs/teacher"
    assert plan_json(out) == json.loads(cfg.model_dump_json()) and plan_json(out)["steps"] == 7
    # the version printed for the chain's own config is the id its real run wrote
    code, out, _ = run(capsys, "teacher", "train", "--preset", "smoke", "--out", "runs/teacher", "--dry-run")
    assert code == 0 and f" {read_teacher_manifest(str(chain['teacher'])).id} -> " in out.splitlines()[0]
    assert list(empty_cwd.iterdir()) == [] and tree(chain["root"]) == before


def test_train_dry_run_prints_the_plan_and_writes_nothing(chain, capsys, empty_cwd):
    from pipeline.training.train2d import read_student_manifest
    before = tree(chain["root"])
    m = read_student_manifest(str(chain["student"]))
    code, out, err = run(capsys, "train", "--pairs", chain["pairs"], "--preset", "smoke", "--out", "runs/student",
                         "--dry-run")
    assert code == 0, err
    assert out.splitlines()[0] == f"dry run: would train {m.version} on 600 pairs -> runs/student"
    assert plan_json(out)["train"]["steps"] == m.steps_done == 40
    code, out, _ = run(capsys, "train", "--pairs", chain["pairs"], "--preset", "smoke", "--set", "train.lr=0.001",
                       "--out", "runs/student", "--dry-run")
    assert code == 0 and plan_json(out)["train"]["lr"] == 0.001 and m.version not in out   # the config is the version
    assert list(empty_cwd.iterdir()) == [] and tree(chain["root"]) == before


def test_teacher_bootstrap_dry_run_prints_the_version_the_real_run_writes(capsys, tmp_path, empty_cwd):
    from image_fixtures import image_folder, write_archive
    from pipeline.data.datasets import prepare_image_dataset
    members, _ = image_folder(np.random.default_rng(0), per_class={"train": 4, "test": 1})
    prepare_image_dataset(str(write_archive(tmp_path / "a.tgz", members)), str(tmp_path / "ds"), progress=False)
    args = ["teacher", "bootstrap", "--dataset", tmp_path / "ds", "--preset", "cifar10-mini", "--device", "cpu",
            *[a for s in ("unet.model_channels=8", "unet.channel_mult=[1]", "unet.num_blocks=1",
                          "unet.attn_resolutions=[]", "batch_size=4", "steps=2", "checkpoint_every=2",
                          "preview_samples=1") for a in ("--set", s)], "--out", "runs/teacher", "-q"]
    before = tree(tmp_path / "ds")
    code, out, err = run(capsys, *args, "--dry-run")
    assert code == 0, err
    first = out.splitlines()[0]
    assert first.startswith("dry run: would train EDM teacher ") and first.endswith(" on 12 images -> runs/teacher")
    plan = plan_json(out)
    assert (plan["device"], plan["steps"], plan["unet"]["model_channels"]) == ("cpu", 2, 8)
    assert list(empty_cwd.iterdir()) == [] and tree(tmp_path / "ds") == before
    # the same command without --dry-run writes the teacher whose id the dry run printed
    assert run(capsys, *args)[0] == 0
    from pipeline.teachers.flow_matching import read_teacher_manifest
    assert first.split()[6] == read_teacher_manifest(str(empty_cwd / "runs" / "teacher")).id


def test_distill_dry_run_validates_and_writes_nothing(capsys, empty_cwd):
    code, out, err = run(capsys, "distill", "--preset", "smoke", "--root", "runs", "--set", "student.train.steps=9",
                         "--dry-run")
    assert code == 0, err
    from pipeline import presets
    from pipeline.teachers.flow_matching import teacher_version
    root = empty_cwd / "runs"
    lines = out.splitlines()
    assert lines[0].split() == ["stage", "state", "pool", "version", "/", "uri"]
    rows = {ln.split()[0]: ln for ln in lines[1:6]}
    assert list(rows) == ["teacher", "pairs", "filter", "student", "evaluation"]
    teacher = teacher_version(presets.load("distill", "smoke").teacher)
    assert rows["teacher"].split()[1:] == ["to", "do", "kdm-cpu", str(root / "teachers" / teacher)]
    assert "(known after the teacher stage)" in rows["pairs"] and "(known after the pairs stage)" in rows["filter"]
    assert f"dry run: recipe checkerboard, preset smoke, 5 of 5 stages to do under {root}" in out
    code, _, err = run(capsys, "distill", "--preset", "smoke", "--root", "runs", "--set", "student.train.steps=0",
                       "--dry-run")
    assert code != 0 and "student.train.steps" in err                   # validated: refused before any stage
    assert list(empty_cwd.iterdir()) == []
