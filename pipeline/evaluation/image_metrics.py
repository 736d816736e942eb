"""Image metrics users can trust: FD / KID on pinned features, FID / IS with the standard Inception,
student-vs-teacher MSE / LPIPS, cached reference statistics, grids and the local-structure figure.

Every value is returned as a ``storage_schemas.protocol.ImageMetric`` carrying its ``EvalProtocol``
(sample count, seeds, quantisation, reference statistics id + sha256, extractor id + sha256, split);
``storage_schemas.protocol.check_comparable`` refuses to compare values made under different protocols
and ``ratio`` applies it before dividing.

Images
    Generated images are quantised with EDM's formula before any distribution metric
    (``quantize_uint8``: ``uint8(clip(x * 127.5 + 128, 0, 255))``; -1 -> 0, 1 -> 255). Data sets are
    uint8 already. Feature extractors take uint8 ``(N, C, H, W)``.

Frechet distance (``frechet_distance``)
    ``|mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2))`` in float64 NumPy, with the trace term as
    ``sum(sqrt(eig(S1^(1/2) S2 S1^(1/2))))`` from two symmetric eigendecompositions (negative
    round-off eigenvalues clipped to 0). ``S1 S2`` and ``S1^(1/2) S2 S1^(1/2)`` are similar, so this
    is the same quantity clean-fid / EDM get from ``scipy.linalg.sqrtm(S1 @ S2)``, without complex
    round-off and several times faster at 2048-d; the tests check agreement with scipy's sqrtm.
    Statistics are ``mean`` and ``np.cov(rowvar=False)`` (ddof 1) in float64, as clean-fid and EDM.

KID (``kid``)
    Unbiased MMD^2 with the polynomial kernel ``k(x, y) = (x.y / d + 1)^3`` (Binkowski et al. 2018),
    averaged over ``subsets`` random subsets of ``subset_size`` samples from each side, exactly
    clean-fid's ``kernel_distance`` estimator but with a seeded ``numpy.random.default_rng(seed)``
    (clean-fid draws from the global, unseeded NumPy RNG). Returns mean and std over subsets.

Precision and recall (``precision_recall``)
    Improved precision / recall (Kynkaanniemi et al. 2019): each feature vector of a set gets the radius of
    the hypersphere reaching its k-th nearest neighbour in its own set (k = ``pr_k`` = 3, self excluded);
    precision is the fraction of generated (fake) vectors inside at least one real hypersphere, recall the
    fraction of real vectors inside at least one fake hypersphere. Squared Euclidean distances in float64
    (``|a|^2 + |b|^2 - 2 a.b`` clipped at 0, in row blocks on the extractor's device); a point on a sphere's
    boundary counts as inside. The real set is the reference split's stored features (all of them: with
    fewer generated than reference images the real spheres are smaller than the fake ones, so compare values
    under one protocol only, which ``check_comparable`` enforces); the real radii are computed once per
    reference and k and cached on the ``ReferenceStats`` object. Reported as ``Precision-<extractor id>`` /
    ``Recall-<extractor id>`` by ``distribution_metrics`` (``with_pr``, on by default).

Offline vs standard
    Features of the offline extractor (``pipeline.evaluation.features``) give ``FD-<extractor id>`` and
    ``KID-<extractor id>``; only the Inception network (``inception-2015-12-05.pt``, the file clean-fid
    downloads into the temp directory) gives ``FID``, ``KID`` and ``IS``. That file is never downloaded
    here and never replaced by random weights: ``inception_weights_path`` looks at an explicit path,
    ``$KDM_INCEPTION_WEIGHTS``, then ``<tempfile.gettempdir()>/inception-2015-12-05.pt`` (where clean-fid
    itself looks: ``/tmp`` on Linux), and a missing file raises ``MetricUnavailable`` naming the path and
    the download address for a machine with internet access. FID / IS follow clean-fid's "clean" mode:
    PIL bicubic resize of the uint8 image to 299x299 in float (clean-fid's own resizer), the TorchScript
    network's ``layers`` on ``(x - 128) / 128`` for the 2048-d features; IS uses
    ``softmax(features @ output.weight.T)`` (no output bias, as StyleGAN / EDM) over ``is_splits`` splits.

Reference statistics
    ``reference_stats`` computes mu, sigma and the features of a data split once and stores them as an
    artifact ``<root>/reference-stats/<id>/`` (``stats.npz``, ``features.npy``, ``manifest.json``) whose
    id hashes the dataset id, split, image bytes and extractor id + sha256; later calls load and verify
    it. Nothing is written inside site-packages (clean-fid's ``make_custom_stats`` would).

Paired metrics
    ``paired_metrics``: MSE on the raw float outputs (image_space 'float'), and LPIPS (``lpips==0.1.4``,
    v0.1 linear heads shipped with the package) on outputs clipped to [-1, 1]. Its backbone is read from
    ``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth`` (``net='vgg'``, override ``$KDM_VGG16_WEIGHTS``) or
    ``alexnet-owt-7be5be79.pth`` (``net='alex'``, ``$KDM_ALEXNET_WEIGHTS``); a missing file or package
    raises ``MetricUnavailable`` naming what to provide.

clean-fid and lpips are optional (``pip install 'kdm[metrics]'``) and imported only when needed.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.distances import hub_checkpoint_path, load_trunk_weights, local_weights_path
from storage_schemas import SeedRange, code_version, recipe_version, stable_hash, utc_now
from storage_schemas.protocol import (INCEPTION_ID, EvalProtocol, ExtractorRef, ImageMetric, ImageMetricReport,
                                      Quantization, ReferenceStatsManifest, check_comparable)

from pipeline.storage import artifacts
from pipeline.errors import KDMError
from pipeline.evaluation.paired import pair_errors, standard_error

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = f"https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/{INCEPTION_FILE}"
INCEPTION_ENV = "KDM_INCEPTION_WEIGHTS"
INCEPTION_RESIZE = "clean-pil-bicubic-299"
LPIPS_BACKBONES = {
    "vgg": ("vgg16-397923af.pth", "KDM_VGG16_WEIGHTS", 13),
    "alex": ("alexnet-owt-7be5be79.pth", "KDM_ALEXNET_WEIGHTS", 5),
}
METRICS_REQUIREMENT = "pip install 'kdm[metrics]' (or: pip install --no-deps clean-fid==0.1.35 lpips==0.1.4, " \
                      "so pip keeps the pinned torch and torchvision)"
REFERENCE_DIR = "reference-stats"
REPORT = "metrics.json"

Array = Union[np.ndarray, torch.Tensor]


class MetricUnavailable(KDMError):
    """A metric cannot be computed here (missing optional package or weights file); the message says how to fix it."""


# ----------------------------------------------------------------------------- quantisation

def quantize_uint8(x: Array, q: Quantization = Quantization()) -> Array:
    """EDM's quantisation ``uint8(clip(x * 127.5 + 128, 0, 255))`` of images in [-1, 1] (numpy or torch).

    The cast truncates, so this rounds ``x * 127.5 + 127.5`` half up: -1 -> 0, 0 -> 128, 1 -> 255.
    NaN has no uint8 value and is refused.
    """
    if isinstance(x, torch.Tensor):
        if torch.isnan(x).any():
            raise ValueError(f"cannot quantise images with {int(torch.isnan(x).sum())} NaN values")
        return (x.double() * q.scale + q.offset).clip(q.low, q.high).to(torch.uint8)
    x = np.asarray(x)
    if np.isnan(x).any():
        raise ValueError(f"cannot quantise images with {int(np.isnan(x).sum())} NaN values")
    return np.clip(x.astype(np.float64) * q.scale + q.offset, q.low, q.high).astype(np.uint8)


def dequantize(u8: Array) -> Array:
    """uint8 -> float in [-1, 1] (``u / 127.5 - 1``)."""
    if isinstance(u8, torch.Tensor):
        return u8.float() / 127.5 - 1.0
    return np.asarray(u8).astype(np.float32) / 127.5 - 1.0


def _as_uint8_images(images: Array, name: str = "images") -> np.ndarray:
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 (N, C, H, W); quantise generated images with quantize_uint8 first, "
                         f"got {images.dtype}")
    if images.ndim != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got {images.shape}")
    return images


# ----------------------------------------------------------------------------- FD and KID

def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance with ddof 1) of features (N, D), in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"features must be (N >= 2, D), got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((S1 S2)^(1/2)) for symmetric PSD S1, S2, via the eigenvalues of S1^(1/2) S2 S1^(1/2)."""
    r = _sqrt_psd(np.asarray(sigma1, dtype=np.float64))
    m = r @ np.asarray(sigma2, dtype=np.float64) @ r
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (see the module docstring)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2))
    return max(value, 0.0)


def fd_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between the Gaussian fits of two feature sets."""
    return frechet_distance(*feature_stats(a), *feature_stats(b))


def kid(features_a: np.ndarray, features_b: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Unbiased polynomial-kernel MMD^2 (KID) averaged over subsets; returns (mean, std over subsets).

    Each subset draws ``m = min(subset_size, len(a), len(b))`` rows of each side without replacement.
    """
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with equal D, got {a.shape} and {b.shape}")
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per side, got {len(a)} and {len(b)}")
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for s in range(subsets):
        x = b[rng.choice(len(b), m, replace=False)]
        y = a[rng.choice(len(a), m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        values[s] = ((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                     - 2.0 * kxy.sum() / (m * m))
    return float(values.mean()), float(values.std())


# ----------------------------------------------------------------------------- precision and recall

PR_BLOCK = 1024


def _pr_tensor(f: Array, device: Optional[str | torch.device]) -> torch.Tensor:
    t = f.detach() if isinstance(f, torch.Tensor) else torch.from_numpy(np.asarray(f))
    if t.ndim != 2:
        raise ValueError(f"features must be (N, D), got {tuple(t.shape)}")
    return t.to(device=device or "cpu", dtype=torch.float64)


def _sq_dists(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    return ((a * a).sum(1, keepdim=True) + b_sq[None, :] - 2.0 * (a @ b.T)).clamp_min_(0.0)


def knn_sq_radii(features: Array, k: int = 3, device: Optional[str | torch.device] = None,
                 block: int = PR_BLOCK) -> np.ndarray:
    """Squared distance of every row to its k-th nearest other row (N,), float64."""
    x = _pr_tensor(features, device)
    if len(x) <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} points, got {len(x)}")
    x_sq = (x * x).sum(1)
    out = []
    for i in range(0, len(x), block):
        d = _sq_dists(x[i:i + block], x, x_sq)
        rows = torch.arange(len(d), device=d.device)
        d[rows, rows + i] = -1.0                      # self: always the smallest, never a neighbour
        out.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(out).cpu().numpy()


def _coverage(points: torch.Tensor, centers: torch.Tensor, sq_radii: torch.Tensor, block: int) -> float:
    """Fraction of ``points`` within (<=) the sphere of at least one of ``centers``."""
    c_sq = (centers * centers).sum(1)
    inside = 0
    for i in range(0, len(points), block):
        d = _sq_dists(points[i:i + block], centers, c_sq)
        inside += int((d <= sq_radii[None, :]).any(dim=1).sum())
    return inside / len(points)


def precision_recall(real: Array, fake: Array, k: int = 3, device: Optional[str | torch.device] = None,
                     real_sq_radii: Optional[np.ndarray] = None, block: int = PR_BLOCK) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of ``fake`` features against ``real``.

    ``real_sq_radii``: the real set's squared k-NN radii when already known (``knn_sq_radii``).
    """
    r, f = _pr_tensor(real, device), _pr_tensor(fake, device)
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"feature sets must have equal D, got {tuple(r.shape)} and {tuple(f.shape)}")
    if real_sq_radii is None:
        real_sq_radii = knn_sq_radii(r, k, device, block)
    r_rad = torch.as_tensor(np.asarray(real_sq_radii, np.float64), device=r.device)
    if r_rad.shape != (len(r),):
        raise ValueError(f"real_sq_radii must have shape ({len(r)},), got {tuple(r_rad.shape)}")
    f_rad = torch.as_tensor(knn_sq_radii(f, k, device, block), device=f.device)
    return _coverage(f, r, r_rad, block), _coverage(r, f, f_rad, block)


def _module_device(module: Any) -> torch.device:
    for getter in ("parameters", "buffers"):
        fn = getattr(module, getter, None)
        if callable(fn):
            for t in fn():
                return t.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------- feature extraction

def extract_features(extractor: Callable[[torch.Tensor], torch.Tensor], images: Array, batch_size: int = 500,
                     device: Optional[str | torch.device] = None) -> np.ndarray:
    """Features (N, D) float32 of uint8 images (N, C, H, W), in batches, without gradients."""
    images = _as_uint8_images(images)
    if device is None:
        p = next(iter(getattr(extractor, "parameters", lambda: iter(()))()), None)
        device = p.device if p is not None else torch.device("cpu")
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).to(device)
            out.append(extractor(x).float().cpu().numpy())
    if not out:
        raise ValueError("no images given")
    return np.concatenate(out)


# ----------------------------------------------------------------------------- Inception (FID, KID, IS)

def inception_weights_path(path: Optional[str | os.PathLike] = None) -> Path:
    """Where the Inception TorchScript file is looked for: ``path``, $KDM_INCEPTION_WEIGHTS, the temp dir."""
    return local_weights_path(path, INCEPTION_ENV, Path(tempfile.gettempdir()) / INCEPTION_FILE)


def _require_cleanfid():
    try:
        from cleanfid.resize import build_resizer
    except ImportError as e:
        raise MetricUnavailable(f"FID / IS need the optional package clean-fid ({e}); {METRICS_REQUIREMENT}") from None
    return build_resizer


class InceptionFeatures(nn.Module):
    """clean-fid "clean" Inception-v3: uint8 (N, 3, H, W) -> 2048-d features; ``probabilities`` for IS."""

    def __init__(self, path: Path, sha256: str):
        super().__init__()
        build_resizer = _require_cleanfid()
        self.base = torch.jit.load(str(path), map_location="cpu").eval()
        self.resize = build_resizer("clean")
        self.path = str(path)
        self.sha256 = sha256
        self.id = INCEPTION_ID
        self.feature_dim = int(self.base.output.weight.shape[1])   # 2048 for the real network

    @property
    def ref(self) -> ExtractorRef:
        return ExtractorRef(id=INCEPTION_ID, sha256=self.sha256, feature_dim=self.feature_dim,
                            input_resize=INCEPTION_RESIZE)

    def _device(self) -> torch.device:
        for t in self.base.parameters():
            return t.device
        return torch.device("cpu")

    def _resized(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"Inception takes RGB images (N, 3, H, W), got {tuple(x.shape)}")
        imgs = x.detach().cpu().numpy()   # uint8 (or floats in [0, 255]); the clean resizer works per channel in float
        batch = [self.resize(np.ascontiguousarray(im.transpose(1, 2, 0))).transpose(2, 0, 1) for im in imgs]
        return torch.from_numpy(np.stack(batch).astype(np.float32)).to(self._device())

    @torch.no_grad()
    def features_and_probabilities(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self._resized(x)
        feats = self.base.layers((z - 128.0) / 128.0).reshape(len(z), -1)
        probs = F.softmax(F.linear(feats, self.base.output.weight), dim=1)
        return feats.float(), probs.float()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self._resized(x)
        return self.base.layers((z - 128.0) / 128.0).reshape(len(z), -1).float()


def load_inception(path: Optional[str | os.PathLike] = None, device: str = "cpu") -> InceptionFeatures:
    """The standard Inception network, from a local file only (see ``inception_weights_path``)."""
    p = inception_weights_path(path)
    if not p.is_file():
        raise MetricUnavailable(
            f"FID / IS need the Inception weights file {p}, which does not exist (nothing is downloaded and no "
            f"random weights are used). Download {INCEPTION_URL} on a machine with internet access and place it at "
            f"exactly {p} (clean-fid's location: {Path(tempfile.gettempdir()) / INCEPTION_FILE}), or point "
            f"${INCEPTION_ENV} at a copy. Offline alternative: FD-/KID-<extractor id> with pipeline.evaluation.features.")
    sha = artifacts.sha256_file(str(p))
    return InceptionFeatures(p, sha).to(device)


def inception_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))) per split (contiguous, as StyleGAN / torch-fidelity); (mean, std)."""
    p = np.asarray(probs, np.float64)
    n = len(p)
    if n < splits:
        raise ValueError(f"IS with {splits} splits needs at least {splits} samples, got {n}")
    scores = []
    for k in range(splits):
        part = p[k * n // splits:(k + 1) * n // splits]
        py = part.mean(axis=0, keepdims=True)
        kl = (part * (np.log(part + 1e-12) - np.log(py + 1e-12))).sum(axis=1).mean()
        scores.append(math.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------- reference statistics

@dataclass
class ReferenceStats:
    manifest: ReferenceStatsManifest
    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray
    url: str
    knn_radii: dict = field(default_factory=dict, repr=False)   # k -> squared k-NN radii of ``features``

    @property
    def ref(self):
        return self.manifest.ref()


def _extractor_ref(extractor: Any) -> ExtractorRef:
    ref = getattr(extractor, "ref", None)
    if not isinstance(ref, ExtractorRef):
        raise TypeError("the extractor must expose .ref (an ExtractorRef): use pipeline.evaluation.features.load_extractor or "
                        "load_inception")
    return ref


def reference_id(dataset_id: str, split: str, extractor: ExtractorRef, images_sha256: str) -> str:
    return "ref-" + stable_hash(recipe_version(), "reference-stats", dataset_id, split, extractor, images_sha256)


def read_reference_manifest(url: str) -> ReferenceStatsManifest:
    return artifacts.read_model(artifacts.join(url, artifacts.MANIFEST), ReferenceStatsManifest)


def load_reference_stats(url: str, verify: bool = True) -> ReferenceStats:
    """Load a reference-statistics artifact; ``verify`` checks both files against the manifest's sha256."""
    m = read_reference_manifest(url)
    stats_b = artifacts.read_bytes(artifacts.join(url, m.stats_file))
    feats_b = artifacts.read_bytes(artifacts.join(url, m.features_file))
    if verify:
        for name, data, want in ((m.stats_file, stats_b, m.stats_sha256), (m.features_file, feats_b, m.features_sha256)):
            got = artifacts.sha256_bytes(data)
            if got != want:
                raise KDMError(f"{url}/{name}: sha256 {got[:16]} does not match the manifest ({want[:16]}); the "
                               f"reference statistics are corrupt or were modified: delete {url} to recompute")
    st = np.load(io.BytesIO(stats_b))
    return ReferenceStats(m, st["mu"], st["sigma"], np.load(io.BytesIO(feats_b)), url)


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def reference_stats(images: Array, *, dataset_id: str, split: str, extractor: Any, root: str,
                    batch_size: int = 500) -> ReferenceStats:
    """mu, sigma and features of uint8 ``images`` (a data split), cached at ``<root>/reference-stats/<id>``."""
    images = _as_uint8_images(images)
    ref = _extractor_ref(extractor)
    images_sha = hashlib.sha256(np.ascontiguousarray(images).data).hexdigest()
    rid = reference_id(dataset_id, split, ref, images_sha)
    url = artifacts.join(root, REFERENCE_DIR, rid)
    if artifacts.committed(url):
        return load_reference_stats(url)
    feats = extract_features(extractor, images, batch_size=batch_size)
    mu, sigma = feature_stats(feats)
    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma)
    stats_b, feats_b = buf.getvalue(), _npy_bytes(feats.astype(np.float32))
    m = ReferenceStatsManifest(id=rid, dataset_id=dataset_id, split=split, num_images=len(images),
                               images_sha256=images_sha, extractor=ref, stats_sha256=artifacts.sha256_bytes(stats_b),
                               features_sha256=artifacts.sha256_bytes(feats_b), code_version=code_version(),
                               created=utc_now())
    tmp = artifacts.begin(url, fresh=True)
    artifacts.write_bytes(artifacts.join(tmp, m.stats_file), stats_b)
    artifacts.write_bytes(artifacts.join(tmp, m.features_file), feats_b)
    artifacts.write_json(artifacts.join(tmp, artifacts.MANIFEST), m)
    artifacts.commit(url)
    return ReferenceStats(m, mu, sigma, feats.astype(np.float32), url)


# ----------------------------------------------------------------------------- distribution metrics

def distribution_protocol(extractor: Any, reference: ReferenceStats, num_samples: int,
                          seeds: Optional[SeedRange] = None, **knobs) -> EvalProtocol:
    """The protocol of FD/KID (or FID/KID/IS) of ``num_samples`` images against ``reference``."""
    ref = _extractor_ref(extractor)
    if ref != reference.manifest.extractor:
        raise KDMError(f"reference statistics {reference.manifest.id} were made with extractor "
                       f"{reference.manifest.extractor.id} ({reference.manifest.extractor.sha256[:12]}), not "
                       f"{ref.id} ({ref.sha256[:12]}); compute reference statistics with this extractor")
    return EvalProtocol(kind="distribution", num_samples=num_samples, seeds=seeds, split=reference.manifest.split,
                        reference=reference.ref, feature_extractor=ref, **knobs)


def metric_names(extractor_id: str) -> dict[str, str]:
    """{'fd', 'kid', 'precision', 'recall'}: 'FID'/'KID' for the Inception network, else 'FD-<id>'/'KID-<id>';
    'Precision-<id>' / 'Recall-<id>' for every network."""
    pr = {"precision": f"Precision-{extractor_id}", "recall": f"Recall-{extractor_id}"}
    if extractor_id == INCEPTION_ID:
        return {"fd": "FID", "kid": "KID", **pr}
    return {"fd": f"FD-{extractor_id}", "kid": f"KID-{extractor_id}", **pr}


def distribution_metrics(images: Array, extractor: Any, reference: ReferenceStats, *, subject: str,
                         seeds: Optional[SeedRange] = None, model_version: Optional[str] = None,
                         with_kid: bool = True, with_is: Optional[bool] = None, with_pr: bool = True,
                         batch_size: int = 500, **knobs) -> list[ImageMetric]:
    """FD (+ KID) of uint8 ``images`` against ``reference``; with the Inception network FID, KID and IS;
    then (``with_pr``) precision and recall with ``pr_k`` neighbours. The order is FD, KID, IS, precision,
    recall (those computed).

    ``seeds`` are the per-sample seeds the images came from (default 0..N-1); ``knobs`` are further
    EvalProtocol fields (kid_subsets, kid_subset_size, kid_seed, is_splits, pr_k).
    """
    images = _as_uint8_images(images)
    protocol = distribution_protocol(extractor, reference, len(images), seeds, **knobs)
    names = metric_names(protocol.feature_extractor.id)
    inception = isinstance(extractor, InceptionFeatures)
    with_is = inception if with_is is None else with_is
    if with_is and not inception:
        raise KDMError("IS is defined for the Inception network only")
    if inception:
        feats, probs = [], []
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                f, p = extractor.features_and_probabilities(torch.from_numpy(images[i:i + batch_size]))
                feats.append(f.cpu().numpy())
                probs.append(p.cpu().numpy())
        feats_np, probs_np = np.concatenate(feats), np.concatenate(probs)
    else:
        feats_np, probs_np = extract_features(extractor, images, batch_size=batch_size), None
    mu, sigma = feature_stats(feats_np)
    common = dict(subject=subject, model_version=model_version, protocol=protocol)
    out = [ImageMetric(name=names["fd"], value=frechet_distance(mu, sigma, reference.mu, reference.sigma), **common)]
    if with_kid:
        v, s = kid(reference.features, feats_np, protocol.kid_subsets, protocol.kid_subset_size, protocol.kid_seed)
        out.append(ImageMetric(name=names["kid"], value=v, std=s, **common))
    if with_is:
        v, s = inception_score(probs_np, protocol.is_splits)
        out.append(ImageMetric(name="IS", value=v, std=s, **common))
    if with_pr:
        k = protocol.pr_k
        dev = _module_device(extractor)
        if k not in reference.knn_radii:
            reference.knn_radii[k] = knn_sq_radii(reference.features, k, dev)
        p, r = precision_recall(reference.features, feats_np, k, dev, real_sq_radii=reference.knn_radii[k])
        out.append(ImageMetric(name=names["precision"], value=p, **common))
        out.append(ImageMetric(name=names["recall"], value=r, **common))
    return out


# ----------------------------------------------------------------------------- paired metrics (student vs teacher)

def lpips_backbone_path(net: str = "vgg", path: Optional[str | os.PathLike] = None) -> Path:
    """Where the LPIPS backbone weights are looked for: ``path``, the net's env var, torch hub's cache."""
    if net not in LPIPS_BACKBONES:
        raise ValueError(f"unknown LPIPS net {net!r}; valid: {', '.join(LPIPS_BACKBONES)}")
    fname, env, _ = LPIPS_BACKBONES[net]
    return local_weights_path(path, env, hub_checkpoint_path(fname))


class LPIPSMetric(nn.Module):
    """Frozen LPIPS v0.1 (``lpips`` package) with a local torchvision backbone; forward(x, y) -> (B,) in [-1, 1]."""

    def __init__(self, net: str = "vgg", weights: Optional[str | os.PathLike] = None):
        super().__init__()
        path = lpips_backbone_path(net, weights)
        fname, env, n_convs = LPIPS_BACKBONES[net]
        problems = []
        try:
            import lpips  # noqa: F401  (optional dependency)
        except ImportError as e:
            lpips = None
            problems.append(f"the optional package lpips is not installed ({e}); {METRICS_REQUIREMENT}")
        if not path.is_file():
            problems.append(f"the {net} backbone weights file {path} does not exist (nothing is downloaded); fetch "
                            f"https://download.pytorch.org/models/{fname} on a machine with internet access and place "
                            f"it at exactly {path} ($TORCH_HOME/hub/checkpoints/{fname}), or point ${env} at a copy")
        if problems:
            raise MetricUnavailable(f"LPIPS-{net} is unavailable: " + "; and ".join(problems))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        state = torch.load(path, map_location="cpu", weights_only=True)
        load_trunk_weights(model.net, state, path, n_convs, MetricUnavailable)
        self.net = model.eval().requires_grad_(False)
        heads = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
        backbone_sha = artifacts.sha256_file(str(path))
        heads_sha = artifacts.sha256_file(str(heads))
        self.sha256 = hashlib.sha256(f"{backbone_sha}:{heads_sha}".encode()).hexdigest()
        self.id = f"lpips-{net}-0.1"
        self.net_name = net

    @property
    def ref(self) -> ExtractorRef:
        return ExtractorRef(id=self.id, sha256=self.sha256, feature_dim=None, input_resize="none")

    def train(self, mode: bool = True) -> "LPIPSMetric":
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape:
            raise ValueError(f"LPIPS inputs differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
        return self.net(x.float().clamp(-1, 1), y.float().clamp(-1, 1)).reshape(len(x)).float()


def load_lpips(net: str = "vgg", weights: Optional[str | os.PathLike] = None, device: str = "cpu") -> LPIPSMetric:
    return LPIPSMetric(net, weights).to(device)


def paired_protocol(num_samples: int, seeds: Optional[SeedRange] = None, pairs_version: Optional[str] = None,
                    extractor: Optional[ExtractorRef] = None) -> EvalProtocol:
    return EvalProtocol(kind="paired", num_samples=num_samples, seeds=seeds, split="heldout", image_space="float",
                        feature_extractor=extractor, pairs_version=pairs_version)


def paired_mse(student: Array, teacher: Array) -> float:
    """Mean over all elements of (student - teacher)^2, in float64."""
    return float(pair_errors(student, teacher).mean())


def paired_metrics(student: Array, teacher: Array, *, seeds: Optional[SeedRange] = None,
                   pairs_version: Optional[str] = None, lpips: Optional[LPIPSMetric] = None,
                   subject: str = "student", model_version: Optional[str] = None,
                   batch_size: int = 100) -> list[ImageMetric]:
    """MSE (and LPIPS when an ``LPIPSMetric`` is given) of student vs teacher outputs from the same noise.

    Both are float images in [-1, 1] (N, C, H, W), row i made from seed ``seeds.start + i``.
    """
    n = len(student)
    err = pair_errors(student, teacher)
    out = [ImageMetric(name="MSE", value=float(err.mean()), stderr=standard_error(err), subject=subject,
                       model_version=model_version, protocol=paired_protocol(n, seeds, pairs_version))]
    if lpips is not None:
        dev = next(lpips.parameters()).device
        vals = []
        for i in range(0, n, batch_size):
            x = torch.as_tensor(np.asarray(student[i:i + batch_size]) if not isinstance(student, torch.Tensor)
                                else student[i:i + batch_size]).to(dev)
            y = torch.as_tensor(np.asarray(teacher[i:i + batch_size]) if not isinstance(teacher, torch.Tensor)
                                else teacher[i:i + batch_size]).to(dev)
            vals.append(lpips(x, y).double().cpu())
        vals = torch.cat(vals).flatten()
        out.append(ImageMetric(name=f"LPIPS-{lpips.net_name}", value=float(vals.mean()), stderr=standard_error(vals),
                               subject=subject, model_version=model_version,
                               protocol=paired_protocol(n, seeds, pairs_version, lpips.ref)))
    return out


# ----------------------------------------------------------------------------- reports

def ratio(a: ImageMetric, b: ImageMetric) -> float:
    """a.value / b.value, refused (ProtocolMismatch) unless both were made under the same protocol."""
    check_comparable(a, b)
    return a.value / b.value


def precision_recall_summary(metrics: Iterable[ImageMetric]) -> dict[str, float]:
    """``{"precision_<subject>": value, "recall_<subject>": value}`` of the Precision-* / Recall-* metrics
    (e.g. for an evaluation manifest's summary beside fd_teacher / fd_student)."""
    out: dict[str, float] = {}
    for m in metrics:
        for kind in ("Precision", "Recall"):
            if m.name.startswith(f"{kind}-"):
                out[f"{kind.lower()}_{m.subject}"] = m.value
    return out


COLLAPSE_RECALL = 0.05   # a student whose recall falls below this is flagged as collapsed


def collapse_note(summary: Mapping[str, Any]) -> Optional[str]:
    """The report's flag for a collapsed student (recall below COLLAPSE_RECALL: its samples cover almost
    none of the data, whatever their precision), or None. ``summary``: an evaluation summary with
    ``recall_student`` (and ``recall_teacher``, quoted when present)."""
    r = summary.get("recall_student")
    if r is None or r >= COLLAPSE_RECALL:
        return None
    t = summary.get("recall_teacher")
    return (f"collapsed: student recall {r:.3f} < {COLLAPSE_RECALL}" + (f" (teacher {t:.3f})" if t is not None else "")
            + ": its samples cover almost none of the data distribution (mode collapse or a blurred average)")


def training_distance_notes(student_manifest: Any, extractor: Any) -> dict[str, Any]:
    """Report notes naming the student's training distance; refuses (KDMError) a student whose distance
    ran on the evaluation extractor's network (``extractor``: its manifest, ExtractorRef or loaded extractor).

    ``student_manifest``: an ``ImageStudentManifest``. Returns ``{"training_distance": name}`` plus, for
    'lpips-own', ``{"training_distance_net": {"id", "sha256"}}``.
    """
    from storage_schemas.kdm_image import distance_label
    net = getattr(student_manifest, "distance_net", None)
    name = getattr(student_manifest, "distance_name", None) or distance_label(student_manifest.model, net)
    notes: dict[str, Any] = {"training_distance": name}
    if net is not None:
        from pipeline.training.perceptual import check_independent
        check_independent(net, extractor)
        notes["training_distance_net"] = net.model_dump(mode="json")
    elif student_manifest.model.distance == "lpips-own":
        raise KDMError(f"student {student_manifest.version} was trained with distance 'lpips-own' but its manifest "
                       f"does not name the network (distance_net): its independence from the evaluation extractor "
                       f"cannot be checked")
    return notes


def make_report(metrics: Sequence[ImageMetric], plots: Optional[dict[str, str]] = None,
                notes: Optional[dict[str, Any]] = None) -> ImageMetricReport:
    return ImageMetricReport(metrics=list(metrics), plots=plots or {}, notes=notes or {},
                             code_version=code_version(), created=utc_now())


def write_report(report: ImageMetricReport, out_dir: str) -> str:
    url = artifacts.join(out_dir, REPORT)
    artifacts.write_json(url, report)
    return url


def read_report(url: str) -> ImageMetricReport:
    if not str(url).endswith(".json"):
        url = artifacts.join(url, REPORT)
    return artifacts.read_model(url, ImageMetricReport)


def metrics_markdown(metrics: Iterable[ImageMetric]) -> str:
    """Markdown table: metric, subject, value (+- std; +- its standard error, s.e.), n, seeds, reference, extractor."""
    rows = ["| metric | subject | value | n | seeds | split | extractor |", "|---|---|---|---|---|---|---|"]
    for m in metrics:
        p = m.protocol
        val = (f"{m.value:.4g}" + (f" ± {m.std:.2g}" if m.std is not None else "")
               + (f" ± {m.stderr:.2g} (s.e.)" if m.stderr is not None else ""))
        fx = f"{p.feature_extractor.id} ({p.feature_extractor.sha256[:8]})" if p.feature_extractor else "-"
        rows.append(f"| {m.name} | {m.subject} | {val} | {p.num_samples} | {p.seeds.text()} | {p.split} | {fx} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- grids

def _grid_array(images: Array, nrow: int, padding: int, pad_value: int) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = quantize_uint8(images)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1 or 3, H, W), got {images.shape}")
    if len(images) == 0:
        raise ValueError("no images to put in a grid")
    if images.shape[1] == 1:
        images = np.repeat(images, 3, axis=1)
    n, _, h, w = images.shape
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    grid = np.full((nrows * (h + padding) + padding, ncol * (w + padding) + padding, 3), pad_value, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, ncol)
        y, x = padding + r * (h + padding), padding + c * (w + padding)
        grid[y:y + h, x:x + w] = im.transpose(1, 2, 0)
    return grid


def _save_png(arr: np.ndarray, path: str | os.PathLike) -> str:
    from PIL import Image
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(p, format="PNG")
    return str(p)


def save_grid(images: Array, path: str | os.PathLike, nrow: int = 8, padding: int = 2, pad_value: int = 255) -> str:
    """Write images as a PNG grid with ``nrow`` images per row (torchvision's convention).

    ``images``: uint8 (N, C, H, W), or floats in [-1, 1] (quantised with EDM's formula). The PNG is
    ``rows * (H + padding) + padding`` pixels high and ``ncol * (W + padding) + padding`` wide, with
    ``ncol = min(nrow, N)`` and ``rows = ceil(N / ncol)``.
    """
    return _save_png(_grid_array(images, nrow, padding, pad_value), path)


def save_side_by_side(left: Array, right: Array, path: str | os.PathLike, nrow: int = 8, padding: int = 2,
                      gap: int = 8, pad_value: int = 255) -> str:
    """Two grids side by side (paper Fig. 4: teacher | student from the same noise), ``gap`` px apart."""
    a, b = _grid_array(left, nrow, padding, pad_value), _grid_array(right, nrow, padding, pad_value)
    h = max(a.shape[0], b.shape[0])
    out = np.full((h, a.shape[1] + gap + b.shape[1], 3), pad_value, np.uint8)
    out[:a.shape[0], :a.shape[1]] = a
    out[:b.shape[0], a.shape[1] + gap:] = b
    return _save_png(out, path)


def save_teacher_student_grid(teacher: Array, student: Array, path: str | os.PathLike, nrow: int = 8) -> str:
    """Teacher (left) | student (right) grid of outputs from the same noise, as a PNG."""
    if len(teacher) != len(student):
        raise ValueError(f"teacher and student grids need the same number of images, got {len(teacher)} and "
                         f"{len(student)}")
    return save_side_by_side(teacher, student, path, nrow=nrow)


def _run_batched(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, batch_size: int) -> np.ndarray:
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            y = fn(x[i:i + batch_size])
            out.append(y.detach().float().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y, np.float32))
    return np.concatenate(out)


def local_structure(student_fn: Callable[[torch.Tensor], Any], teacher_fn: Callable[[torch.Tensor], Any],
                    x_T: Array, sigmas: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6), seed: int = 0,
                    per_sigma: int = 8, noise_scale: float = 1.0, path: Optional[str | os.PathLike] = None,
                    batch_size: int = 64) -> dict[str, Any]:
    """Local-structure experiment (paper Sec. 6.1, Fig. 3): both models on perturbations of one noise.

    ``x_T``: one unit-variance noise sample (C, H, W) (or (1, C, H, W)). For each sigma and each of
    ``per_sigma`` directions eps_j ~ N(0, I) (drawn once from ``torch.Generator().manual_seed(seed)``
    and shared by all sigmas, so column j walks away from x_T along eps_j), the perturbed noise is
    ``x_T + sigma * eps_j``, renormalised to zero mean and unit std over its elements as in the paper,
    and both functions receive ``noise_scale *`` it (80 for EDM / KDM images). Returns ``sigmas``,
    ``noise`` (S, P, C, H, W) and uint8 ``teacher`` / ``student`` outputs (S, P, C, H, W); with ``path``
    also writes a PNG: teacher grid left, student grid right, one row per sigma.
    """
    x = torch.as_tensor(np.asarray(x_T) if not isinstance(x_T, torch.Tensor) else x_T).float().cpu()
    if x.ndim == 4:
        if x.shape[0] != 1:
            raise ValueError(f"x_T must be one sample (C, H, W) or (1, C, H, W), got {tuple(x.shape)}")
        x = x[0]
    if x.ndim != 3:
        raise ValueError(f"x_T must be (C, H, W), got {tuple(x.shape)}")
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn((per_sigma, *x.shape), generator=g)
    noise = []
    for s in sigmas:
        z = x[None] + float(s) * eps
        flat = z.flatten(1)
        z = ((flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True)).view_as(z)
        noise.append(z)
    noise_t = torch.stack(noise)                            # (S, P, C, H, W)
    inputs = noise_scale * noise_t.flatten(0, 1)
    shape = (len(sigmas), per_sigma)
    teacher = quantize_uint8(_run_batched(teacher_fn, inputs, batch_size)).reshape(*shape, *x.shape)
    student = quantize_uint8(_run_batched(student_fn, inputs, batch_size)).reshape(*shape, *x.shape)
    result = {"sigmas": [float(s) for s in sigmas], "noise": noise_t.numpy(), "teacher": teacher, "student": student}
    if path is not None:
        result["path"] = save_side_by_side(teacher.reshape(-1, *x.shape), student.reshape(-1, *x.shape), path,
                                           nrow=per_sigma)
    return result
