"""``kdm pairs import`` from the command line, for every format it knows (--help lists them, their options
are flags): kdm-trajectories, kdm-npz (--order), get-pt (--noise-scale), and plain npz (x_T, x_0, seed, label)."""
import numpy as np
import pytest

from pipeline.cli import main
from pipeline.storage.pairstore import PairStore
from test_import_formats import SHAPE, pairs_data, write_get_folder, write_npz_folder

FORMATS = ("kdm-trajectories", "kdm-npz", "get-pt", "npz")


def kdm(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_help_lists_every_format_and_its_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["pairs", "import", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "(formats: kdm-trajectories, kdm-npz, get-pt, npz)" in " ".join(text.split())
    for f in FORMATS:
        assert f"  {f} " in text, f
    for opt in ("--format {kdm-trajectories,kdm-npz,get-pt,npz}", "--order {xT-first,x0-first}", "--noise-scale", "--holdout", "--split-seed", "--chunk-size"):
        assert opt in text, opt
    assert "kdm pairs import gen.npz --format npz --holdout 0 --out runs/pairs" in text


def test_kdm_trajectories(tmp_path, capsys):
    traj = np.random.default_rng(0).standard_normal((3, 10, 2)).astype(np.float32)
    np.save(tmp_path / "t.npy", traj)
    rc, out, err = kdm(capsys, "pairs", "import", tmp_path / "t.npy", "--format", "kdm-trajectories", "--holdout", "0.2",
                       "--out", tmp_path / "s")
    assert rc == 0, err
    s = PairStore.open(str(tmp_path / "s"))
    d, h = s.load(), s.heldout().load()
    assert len(d["seed"]) == 8 and len(h["seed"]) == 2
    assert np.array_equal(d["x_T"], traj[0][d["seed"]]) and np.array_equal(d["x_0"], traj[-1][d["seed"]])
    assert out.strip().endswith(f"imported {s.version}: 8 train + 2 held out from {tmp_path / 't.npy'} at {tmp_path / 's'}")


def test_kdm_npz_takes_order_as_a_flag(tmp_path, capsys):
    x_T, x_0, labels = pairs_data(6)
    src = write_npz_folder(tmp_path / "npz", x_T, x_0, labels, "xT-first")
    rc, _, err = kdm(capsys, "pairs", "import", src, "--format", "kdm-npz", "--holdout", "0", "--out", tmp_path / "no")
    assert rc == 1 and err.strip() == ("kdm pairs: error: --format kdm-npz needs --order: xT-first (the official "
                                       "CIFAR-10 unconditional training set) or x0-first (conditional CIFAR-10, "
                                       "FFHQ, AFHQv2, the test sets)")
    assert not (tmp_path / "no").exists()
    rc, out, err = kdm(capsys, "pairs", "import", src, "--format", "kdm-npz", "--order", "xT-first", "--holdout", "0",
                       "--out", tmp_path / "s")
    assert rc == 0, err
    s = PairStore.open(str(tmp_path / "s"))
    d = s.load()
    assert np.allclose(d["x_T"], x_T[d["seed"]], atol=1e-4) and np.allclose(d["x_0"], x_0[d["seed"]], atol=1e-6)
    assert s.manifest.import_info.order == "xT-first" and s.manifest.x_T_scale == 80.0
    assert "(x_T_scale 80, 0 classes)" in out


def test_get_pt_with_a_noise_scale(tmp_path, capsys):
    rng = np.random.default_rng(1)
    eps = rng.standard_normal((6, *SHAPE)).astype(np.float32)
    x_0 = rng.uniform(-1, 1, (6, *SHAPE))
    src = write_get_folder(tmp_path / "get", eps, x_0)
    rc, out, err = kdm(capsys, "pairs", "import", src, "--format", "get-pt", "--noise-scale", "2.5", "--holdout", "0",
                       "--out", tmp_path / "s")
    assert rc == 0, err
    s = PairStore.open(str(tmp_path / "s"))
    d = s.load()
    assert np.allclose(d["x_T"], 2.5 * eps[d["seed"]], atol=1e-5) and s.manifest.x_T_scale == 2.5
    assert "(x_T_scale 2.5, 0 classes)" in out


def test_npz_what_other_samplers_export(tmp_path, capsys):
    rng = np.random.default_rng(2)
    n = 10
    x_T = (80 * rng.standard_normal((n, 3, 8, 8))).astype(np.float32)
    x_0 = rng.uniform(-1, 1, (n, 3, 8, 8)).astype(np.float32)
    seed = np.arange(1000, 1000 + n, dtype=np.int64)[::-1].copy()
    label = rng.integers(0, 10, n)
    np.savez(tmp_path / "gen.npz", x_T=x_T, x_0=x_0, seed=seed, label=label)
    rc, out, err = kdm(capsys, "pairs", "import", tmp_path / "gen.npz", "--format", "npz", "--holdout", "0",
                       "--out", tmp_path / "s")
    assert rc == 0, err
    s = PairStore.open(str(tmp_path / "s"))
    d = s.load()
    assert s.heldout() is None and len(d["seed"]) == n
    assert np.array_equal(d["x_T"], x_T) and np.array_equal(d["x_0"], x_0)      # file order, exact float32
    assert np.array_equal(d["seed"], seed) and np.array_equal(d["label"], label)
    assert s.manifest.num_classes == int(label.max()) + 1 and s.manifest.x_T_scale == 80.0
    assert s.manifest.import_info.format == "npz" and s.manifest.sample_shape == (3, 8, 8)
    assert out.strip().endswith(f"imported {s.version}: 10 train + 0 held out from {tmp_path / 'gen.npz'} "
                                f"(x_T_scale 80, {s.manifest.num_classes} classes) at {tmp_path / 's'}")
    # without seed and label: the seeds are the indices, the pairs unconditional; a held-out split works too
    np.savez(tmp_path / "plain.npz", x_T=x_T, x_0=x_0)
    rc, _, err = kdm(capsys, "pairs", "import", tmp_path / "plain.npz", "--format", "npz", "--holdout", "0.2",
                     "--noise-scale", "1", "--out", tmp_path / "p")
    assert rc == 0, err
    p = PairStore.open(str(tmp_path / "p"))
    d, h = p.load(), p.heldout().load()
    assert sorted(d["seed"].tolist() + h["seed"].tolist()) == list(range(n))
    assert np.array_equal(d["x_0"], x_0[d["seed"]]) and (d["label"] == -1).all() and p.manifest.num_classes == 0
    assert p.manifest.x_T_scale == 1.0


@pytest.mark.parametrize("arrays,words", [
    ({"x_T": np.zeros((2, 3, 4, 4))}, "format npz needs arrays x_T and x_0 (N, C, H, W); missing x_0 (arrays: x_T)"),
    ({"x_T": np.zeros((2, 3, 4, 4)), "x_0": np.zeros((3, 3, 4, 4))}, "differ in shape"),
    ({"x_T": np.zeros((2, 3, 4, 4)), "x_0": np.zeros((2, 3, 4, 4)), "seed": np.array([1.5, 2])},
     "seed must be (N,) = (2,) non-negative integers"),
    ({"x_T": np.zeros((2, 3, 4, 4)), "x_0": np.zeros((2, 3, 4, 4)), "label": np.zeros((3,), int)},
     "label must be (N,) = (2,) class indices"),
])
def test_npz_errors_say_what_the_file_needs(tmp_path, capsys, arrays, words):
    np.savez(tmp_path / "bad.npz", **arrays)
    rc, _, err = kdm(capsys, "pairs", "import", tmp_path / "bad.npz", "--format", "npz", "--holdout", "0",
                     "--out", tmp_path / "s")
    assert rc == 1 and words in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "s").exists()


def test_options_of_other_formats_are_refused(tmp_path, capsys):
    rc, _, err = kdm(capsys, "pairs", "import", tmp_path / "x.npz", "--format", "npz", "--order", "xT-first",
                     "--holdout", "0", "--out", tmp_path / "s")
    assert rc == 1 and "--order applies to --format kdm-npz only, not npz" in err
    rc, _, err = kdm(capsys, "pairs", "import", tmp_path / "x.npy", "--format", "kdm-trajectories", "--noise-scale",
                     "2", "--holdout", "0", "--out", tmp_path / "s")
    assert rc == 1 and "--noise-scale applies to the image formats" in err


def test_an_unknown_format_lists_the_known_ones(tmp_path, capsys):
    rc, _, err = kdm(capsys, "pairs", "import", tmp_path / "x", "--format", "hdf5", "--holdout", "0", "--out",
                     tmp_path / "s")
    assert rc == 1 and err.strip() == ("kdm pairs: error: --format 'hdf5' is not a known import format; formats: "
                                       "kdm-trajectories, kdm-npz, get-pt, npz (kdm pairs import --help describes them)")
