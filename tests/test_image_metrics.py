import importlib
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root, when run as plain `pytest`

from pipeline.evaluation import image_metrics as im
from pipeline.errors import KDMError
from storage_schemas import SeedRange  # noqa: E402
from storage_schemas.protocol import ExtractorRef, ProtocolMismatch  # noqa: E402

torch.set_num_threads(1)


class MeanColour(nn.Module):
    """A stand-in extractor: per-channel means and stds of uint8 images (6-d features)."""

    def __init__(self, id_="meancolour-v1", sha="c" * 64):
        super().__init__()
        self.ref = ExtractorRef(id=id_, sha256=sha, feature_dim=6, input_resize="none")
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        x = x.float()
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


def images(n, seed=0, shift=0):
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(128 + shift, 40, (n, 3, 8, 8)), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- FD


def test_fd_of_identical_sets_is_zero():
    f = np.random.default_rng(0).normal(size=(500, 16))
    assert im.fd_from_features(f, f) == pytest.approx(0.0, abs=1e-8)


def test_fd_matches_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    got = im.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(want, rel=1e-10)
    # and from samples of those Gaussians
    rng = np.random.default_rng(1)
    a = mu1 + rng.normal(size=(200_000, 3)) * np.sqrt(v1)
    b = mu2 + rng.normal(size=(200_000, 3)) * np.sqrt(v2)
    assert im.fd_from_features(a, b) == pytest.approx(want, rel=0.02)


def test_fd_agrees_with_scipy_sqrtm_on_full_covariances():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(40, 20)), rng.normal(size=(40, 20))
    s1, s2 = a.T @ a / 40, b.T @ b / 40 + 0.1 * np.eye(20)
    mu1, mu2 = rng.normal(size=20), rng.normal(size=20)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    want = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert im.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)


def test_fd_agrees_with_cleanfid():
    fid = importlib.import_module("cleanfid.fid")
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(300, 8)), rng.normal(0.3, 1.2, size=(300, 8))
    assert im.fd_from_features(a, b) == pytest.approx(fid.fid_from_feats(a, b), rel=1e-6)


# ----------------------------------------------------------------------------- KID


def test_kid_near_zero_for_same_distribution_and_positive_when_shifted():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(2000, 16)), rng.normal(size=(2000, 16))
    same, same_std = im.kid(a, b, subsets=20, subset_size=500, seed=0)
    assert abs(same) < 0.01 and abs(same) < 3 * same_std + 1e-3
    shifted, _ = im.kid(a, b + 0.5, subsets=20, subset_size=500, seed=0)
    assert shifted > 0.1 and shifted > 20 * abs(same)
    assert im.kid(a, b, 5, 100, seed=7) == im.kid(a, b, 5, 100, seed=7)   # seeded


def test_kid_equals_cleanfid_estimator_on_full_sets():
    fid = importlib.import_module("cleanfid.fid")
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(200, 6)), rng.normal(0.2, 1.0, size=(200, 6))
    ours, _ = im.kid(a, b, subsets=1, subset_size=200)
    assert ours == pytest.approx(fid.kernel_distance(a, b, num_subsets=1, max_subset_size=200), rel=1e-9)


# ----------------------------------------------------------------------------- quantisation


def test_quantisation_matches_edm_formula_on_edge_values():
    x = np.array([-2.0, -1.0, -1.0 + 1e-9, -0.999, 0.0, 0.5, 0.99, 1.0, 1.5, np.inf, -np.inf])
    q = im.quantize_uint8(x)
    # -1*127.5+128 = 0.5 -> 0; 1*127.5+128 = 255.5 -> clip 255; truncation of the cast rounds half up
    assert q.dtype == np.uint8
    assert q.tolist() == [0, 0, 0, 0, 128, 191, 254, 255, 255, 255, 0]
    edm = (torch.tensor(x) * 127.5 + 128).clip(0, 255).to(torch.uint8)
    assert q.tolist() == edm.tolist()
    assert im.quantize_uint8(torch.tensor(x)).tolist() == q.tolist()
    grid = np.linspace(-1.2, 1.2, 10_001)
    assert (im.quantize_uint8(grid) == (torch.tensor(grid) * 127.5 + 128).clip(0, 255).to(torch.uint8).numpy()).all()
    assert np.abs(im.dequantize(im.quantize_uint8(grid)) - grid.clip(-1, 1)).max() <= 0.5 / 127.5 + 1e-6
    with pytest.raises(ValueError, match="NaN"):
        im.quantize_uint8(np.array([0.0, np.nan]))


def test_distribution_metrics_refuse_float_images(tmp_path):
    fx = MeanColour()
    ref = im.reference_stats(images(50), dataset_id="toy", split="train", extractor=fx, root=str(tmp_path))
    with pytest.raises(ValueError, match="quantize_uint8"):
        im.distribution_metrics(images(20).astype(np.float32), fx, ref, subject="student")


# ----------------------------------------------------------------------------- offline metrics and reports


def test_offline_metric_names_never_say_fid(tmp_path):
    fx = MeanColour()
    ref = im.reference_stats(images(200), dataset_id="toy", split="train", extractor=fx, root=str(tmp_path))
    ms = im.distribution_metrics(images(100, seed=1), fx, ref, subject="student", kid_subsets=5, kid_subset_size=50)
    names = [m.name for m in ms]
    assert names == ["FD-meancolour-v1", "KID-meancolour-v1", "Precision-meancolour-v1", "Recall-meancolour-v1"]
    assert not any("FID" in n.upper() for n in names)
    report = im.make_report(ms)
    path = im.write_report(report, str(tmp_path / "eval"))
    assert "FID" not in Path(path).read_text()
    assert im.read_report(str(tmp_path / "eval")) == report
    table = im.metrics_markdown(ms)
    assert "FD-meancolour-v1" in table and "FID" not in table
    p = ms[0].protocol
    assert p.reference.id == ref.manifest.id and p.reference.sha256 == ref.manifest.stats_sha256
    assert p.feature_extractor == fx.ref and p.num_samples == 100 and p.seeds == SeedRange(start=0, stop=100)


# ----------------------------------------------------------------------------- precision / recall


def _blob(n, centre, seed, d=8):
    return np.random.default_rng(seed).normal(size=(n, d)) + centre


def test_precision_recall_known_answers():
    a = _blob(60, 0.0, 0)
    # identical sets: every point lies on (inside) its own sphere
    assert im.precision_recall(a, a.copy(), k=3) == (1.0, 1.0)
    # disjoint sets far apart: no fake point near any real sphere and vice versa
    assert im.precision_recall(a, _blob(50, 1000.0, 1), k=3) == (0.0, 0.0)
    # fake = a subset of real (one of two far clusters): precision 1, recall about one half
    b = _blob(60, 500.0, 2)
    real = np.concatenate([a, b])
    p, r = im.precision_recall(real, a[:40], k=3)
    assert p == 1.0 and r < 1.0 and r == pytest.approx(0.5, abs=0.1)
    # the real radii can be passed in (cached per reference) with the same answer
    radii = im.knn_sq_radii(real, 3)
    assert radii.shape == (120,) and (radii > 0).all()
    assert im.precision_recall(real, a[:40], k=3, real_sq_radii=radii) == (p, r)
    # k-th neighbour excludes the point itself: 4 collinear points at 0, 1, 3, 7 with k=1 -> 1, 1, 2, 4
    line = np.array([[0.0], [1.0], [3.0], [7.0]])
    assert np.allclose(im.knn_sq_radii(line, 1), [1.0, 1.0, 4.0, 16.0])
    with pytest.raises(ValueError, match="more than 3 points"):
        im.knn_sq_radii(a[:3], 3)
    with pytest.raises(ValueError, match="equal D"):
        im.precision_recall(a, a[:, :4])


def test_precision_recall_in_the_report_with_their_protocol(tmp_path):
    fx = MeanColour()
    ref = im.reference_stats(images(200), dataset_id="toy", split="train", extractor=fx, root=str(tmp_path))
    t = im.distribution_metrics(images(100, 1), fx, ref, subject="teacher", with_kid=False)
    s = im.distribution_metrics(images(100, 2, shift=60), fx, ref, subject="student", with_kid=False)
    assert [m.name for m in t] == ["FD-meancolour-v1", "Precision-meancolour-v1", "Recall-meancolour-v1"]
    tp, tr, sp = t[1].value, t[2].value, s[1].value
    assert 0.5 < tp <= 1.0 and 0.5 < tr <= 1.0 and sp < tp     # shifted images fall off the real manifold
    assert t[1].protocol.pr_k == 3 and t[1].protocol == t[0].protocol
    assert 3 in ref.knn_radii                                 # real radii computed once per reference
    assert im.ratio(s[1], t[1]) == pytest.approx(sp / tp)
    k5 = im.distribution_metrics(images(100, 1), fx, ref, subject="teacher", with_kid=False, pr_k=5)
    im.ratio(s[0], k5[0])                                     # FD does not depend on pr_k
    with pytest.raises(ProtocolMismatch, match="pr_k"):
        im.ratio(s[1], k5[1])
    assert "Precision-meancolour-v1" in im.metrics_markdown(t)
    assert im.precision_recall_summary(t + s) == {"precision_teacher": tp, "recall_teacher": tr,
                                                  "precision_student": sp, "recall_student": s[2].value}
    assert im.metric_names("x")["recall"] == "Recall-x"
    with pytest.raises(ValueError, match="names extractor"):
        im.ImageMetric(name="Precision-other", value=1.0, subject="s", protocol=t[1].protocol)


def test_fd_ratio_requires_the_same_protocol(tmp_path):
    fx = MeanColour()
    ref = im.reference_stats(images(200), dataset_id="toy", split="train", extractor=fx, root=str(tmp_path))
    seeds = SeedRange(start=1000, stop=1100)
    t = im.distribution_metrics(images(100, 1), fx, ref, subject="teacher", seeds=seeds, with_kid=False)[0]
    s = im.distribution_metrics(images(100, 2, shift=30), fx, ref, subject="student", seeds=seeds, with_kid=False)[0]
    assert s.value > t.value
    assert im.ratio(s, t) == pytest.approx(s.value / t.value)
    other = im.distribution_metrics(images(100, 2, shift=30), fx, ref, subject="student", with_kid=False)[0]
    with pytest.raises(ProtocolMismatch, match=r"seeds\.start"):
        im.ratio(other, t)


def test_reference_stats_are_cached_and_verified(tmp_path):
    fx = MeanColour()
    x = images(120)
    a = im.reference_stats(x, dataset_id="toy", split="train", extractor=fx, root=str(tmp_path))
    calls = fx.calls
    b = im.reference_stats(x, dataset_id="toy", split="train", extractor=fx, root=str(tmp_path))
    assert fx.calls == calls and b.url == a.url       # loaded, not recomputed
    assert np.array_equal(a.mu, b.mu) and np.array_equal(a.sigma, b.sigma) and a.features.shape == (120, 6)
    assert Path(a.url).parent.name == "reference-stats"
    # another extractor (or other weights) -> other statistics
    c = im.reference_stats(x, dataset_id="toy", split="train", extractor=MeanColour(sha="d" * 64), root=str(tmp_path))
    assert c.url != a.url
    with pytest.raises(KDMError, match="were made with extractor"):
        im.distribution_protocol(MeanColour(sha="d" * 64), a, 10)
    stats = Path(a.url) / "stats.npz"
    stats.write_bytes(stats.read_bytes() + b"x")
    with pytest.raises(KDMError, match="corrupt or were modified"):
        im.load_reference_stats(a.url)


# ----------------------------------------------------------------------------- Inception / LPIPS availability


def test_inception_missing_error_names_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv(im.INCEPTION_ENV, raising=False)
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    want = tmp_path / "inception-2015-12-05.pt"
    assert im.inception_weights_path() == want
    with pytest.raises(im.MetricUnavailable) as e:
        im.load_inception()
    assert str(want) in str(e.value) and im.INCEPTION_URL in str(e.value)
    configured = tmp_path / "weights" / "inc.pt"
    with pytest.raises(im.MetricUnavailable, match=str(configured)):
        im.load_inception(configured)
    monkeypatch.setenv(im.INCEPTION_ENV, str(configured))
    assert im.inception_weights_path() == configured


def _fake_inception(path: Path) -> None:
    class Fake(nn.Module):
        def __init__(self):
            super().__init__()
            # the real network maps to 2048-d features and 1008 classes; 32 / 10 keep the test fast
            self.layers = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 32))
            self.output = nn.Linear(32, 10)

        def forward(self, x):
            return self.layers(x)

    torch.manual_seed(0)
    torch.jit.script(Fake()).save(str(path))


def test_fid_kid_is_with_inception_file_present(tmp_path, monkeypatch):
    import cleanfid  # noqa: F401  (installed by make test)
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.delenv(im.INCEPTION_ENV, raising=False)
    _fake_inception(tmp_path / im.INCEPTION_FILE)
    inc = im.load_inception()
    assert inc.ref.id == "inception-2015-12-05" and inc.ref.input_resize == "clean-pil-bicubic-299"
    ref = im.reference_stats(images(12), dataset_id="toy", split="train", extractor=inc, root=str(tmp_path / "a"))
    ms = im.distribution_metrics(images(10, 1), inc, ref, subject="student", kid_subsets=2, kid_subset_size=5,
                                 is_splits=2, batch_size=4)
    assert [m.name for m in ms] == ["FID", "KID", "IS", "Precision-inception-2015-12-05",
                                    "Recall-inception-2015-12-05"]
    assert all(np.isfinite(m.value) for m in ms) and ms[2].value >= 1.0


def test_lpips_missing_error_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("KDM_VGG16_WEIGHTS", raising=False)
    monkeypatch.delenv("KDM_ALEXNET_WEIGHTS", raising=False)
    for net, fname in (("vgg", "vgg16-397923af.pth"), ("alex", "alexnet-owt-7be5be79.pth")):
        want = tmp_path / "hub" / "checkpoints" / fname
        assert im.lpips_backbone_path(net) == want
        with pytest.raises(im.MetricUnavailable) as e:
            im.load_lpips(net)
        assert str(want) in str(e.value)


def test_lpips_and_mse_paired_metrics_with_local_backbone(tmp_path, monkeypatch):
    lpips = importlib.import_module("lpips")
    torch.manual_seed(0)
    trunk = lpips.pn.alexnet(requires_grad=False, pretrained=False)
    state = {}
    for k in range(1, trunk.N_slices + 1):
        for name, mod in getattr(trunk, f"slice{k}").named_children():
            if isinstance(mod, nn.Conv2d):
                state[f"features.{name}.weight"], state[f"features.{name}.bias"] = mod.weight, mod.bias
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(state, path)
    metric = im.load_lpips("alex", weights=path)
    rng = np.random.default_rng(0)
    t = rng.uniform(-1, 1, (6, 3, 32, 32)).astype(np.float32)
    s = (t + rng.normal(0, 0.1, t.shape)).astype(np.float32)
    ms = im.paired_metrics(s, t, seeds=SeedRange(start=50_000, stop=50_006), lpips=metric)
    assert [m.name for m in ms] == ["MSE", "LPIPS-alex"]
    assert ms[0].value == pytest.approx(np.mean((s.astype(np.float64) - t) ** 2))
    assert ms[1].value > 0 and ms[1].protocol.feature_extractor.id == "lpips-alex-0.1"
    # the standard error of each mean over the 6 pairs: MSE from the per-image errors, LPIPS from its values
    per_image = ((s.astype(np.float64) - t) ** 2).reshape(6, -1).mean(axis=1)
    assert ms[0].stderr == pytest.approx(per_image.std(ddof=1) / np.sqrt(6))
    assert 0 < ms[1].stderr < ms[1].value
    table = im.metrics_markdown(ms)
    assert f"| MSE | student | {ms[0].value:.4g} ± {ms[0].stderr:.2g} (s.e.) | 6 |" in table
    assert "stderr" in ms[0].model_dump() and "stderr" not in ms[0].model_copy(update={"stderr": None}).model_dump()
    same = im.paired_metrics(t, t, lpips=metric)
    assert same[0].value == 0.0 and same[1].value == pytest.approx(0.0, abs=1e-6) and same[0].stderr == 0.0


# ----------------------------------------------------------------------------- grids


def test_save_grid_writes_png_of_the_right_size(tmp_path):
    from PIL import Image
    x = images(10)
    p = im.save_grid(x, tmp_path / "g.png", nrow=4)
    with Image.open(p) as img:
        assert img.format == "PNG" and img.size == (4 * 10 + 2, 3 * 10 + 2)   # (width, height)
        arr = np.asarray(img)
    assert np.array_equal(arr[2:10, 2:10], x[0].transpose(1, 2, 0))          # first image, after the padding
    floats = np.zeros((3, 3, 8, 8), np.float32)
    with Image.open(im.save_grid(floats, tmp_path / "f.png", nrow=8, padding=0)) as img:
        assert img.size == (24, 8) and np.asarray(img).max() == 128            # 0.0 -> 128 (EDM)
    with Image.open(im.save_teacher_student_grid(x[:4], x[4:8], tmp_path / "ts.png", nrow=2)) as img:
        assert img.size == (2 * (2 * 10 + 2) + 8, 2 * 10 + 2)


def test_local_structure_grid(tmp_path):
    torch.manual_seed(0)
    x_T = torch.randn(3, 8, 8)
    teacher = lambda z: torch.tanh(z / 80.0 * 3)           # noqa: E731
    student = lambda z: torch.tanh(z / 80.0 * 3) * 0.9     # noqa: E731
    out = im.local_structure(student, teacher, x_T, seed=1, per_sigma=4, noise_scale=80.0,
                             path=tmp_path / "local.png", batch_size=5)
    assert out["sigmas"] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert out["teacher"].shape == (7, 4, 3, 8, 8) and out["teacher"].dtype == np.uint8
    assert out["student"].shape == (7, 4, 3, 8, 8)
    z = out["noise"]
    assert np.allclose(z.reshape(28, -1).std(1, ddof=1), 1.0, atol=1e-5)
    assert np.allclose(z[0], z[0, :1])                                      # sigma 0: the original noise
    assert not np.allclose(z[-1, 0], z[-1, 1])
    again = im.local_structure(student, teacher, x_T, seed=1, per_sigma=4, noise_scale=80.0)
    assert np.array_equal(again["student"], out["student"])
    from PIL import Image
    with Image.open(out["path"]) as img:
        assert img.size == (2 * (4 * 10 + 2) + 8, 7 * 10 + 2)


def test_collapse_flag_below_recall_threshold_and_in_the_headline():
    from pipeline.recipes.cifar10 import headline
    assert im.COLLAPSE_RECALL == 0.05
    ok = {"fd_ratio": 1.2, "recall_student": 0.05, "recall_teacher": 0.5, "precision_student": 0.7,
          "precision_teacher": 0.7, "notes": {"training_distance": "lpips-own:pnet-x"}}
    assert im.collapse_note(ok) is None                           # at the threshold: not flagged
    assert im.collapse_note({"recall_student": None}) is None     # no recall computed: nothing to say
    bad = {**ok, "recall_student": 0.007, "precision_student": 1.0}
    note = im.collapse_note(bad)
    assert note.startswith("collapsed: student recall 0.007 < 0.05 (teacher 0.500)")
    text = headline({**bad, "notes": {**ok["notes"], "collapse": note}})
    assert "FD ratio student / teacher: **1.200**" in text and "`lpips-own:pnet-x`" in text
    assert "precision / recall student 1.000 / 0.007, teacher 0.700 / 0.500" in text
    assert "**Student collapsed: student recall 0.007" in text
    assert "collapsed" not in headline(ok)
