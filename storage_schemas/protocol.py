"""Image evaluation protocol, metric reports, and the artifacts a protocol refers to.

A number such as an FID is only meaningful together with how it was made: how many samples, from
which seeds, how images were quantised, which reference statistics and which feature network. Every
``ImageMetric`` therefore carries its full ``EvalProtocol``, and ``check_comparable`` refuses to put
two numbers side by side (a table row, a ratio, a "better than") when their protocols differ.

Metric names say which network made them:

* ``FID``, ``KID``, ``IS``: the standard Inception-v3 (``inception-2015-12-05``, clean-fid's "clean"
  mode: PIL bicubic resize to 299x299) only.
* ``FD-<extractor id>``, ``KID-<extractor id>``: Frechet distance / kernel inception-style distance on
  the features of any other network (e.g. the offline classifier trained by ``pipeline.evaluation.features``).
  Such numbers are *not* FIDs and are never named so; extractor ids may not contain "fid".
* ``Precision-<extractor id>``, ``Recall-<extractor id>``: improved precision and recall (Kynkaanniemi et
  al. 2019) with ``pr_k`` nearest neighbours (3) on the same features, under the same distribution protocol
  (the reference split's features are the real set, the generated images the fake set).
* ``MSE``, ``LPIPS-vgg``, ``LPIPS-alex``: student vs teacher on the same noise (paired protocol).

Quantisation is EDM's (``generate.py`` / ``fid.py``): ``uint8(clip(x * 127.5 + 128, 0, 255))``; the
cast truncates, so this rounds ``x * 127.5 + 127.5`` to the nearest integer: -1 -> 0, 1 -> 255.

This module is part of the leaf package: pydantic only.
"""
from __future__ import annotations

import re
from typing import Any, Literal, Optional, Union

from pydantic import Field, field_validator, model_serializer, model_validator

from .common import SCHEMA_VERSION, SeedRange, Strict, drop_unset

INCEPTION_ID = "inception-2015-12-05"
INCEPTION_METRICS = ("FID", "KID", "IS")
PAIRED_METRICS = ("MSE", "LPIPS-vgg", "LPIPS-alex")
_EXTRACTOR_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _check_sha256(v: str) -> str:
    if not _SHA256.fullmatch(v):
        raise ValueError(f"sha256 must be 64 lowercase hex digits, got {v!r}")
    return v


class ProtocolMismatch(ValueError):
    """Two metric values were made under different protocols; the message lists every differing field."""


class Quantization(Strict):
    """EDM's uint8 quantisation: ``uint8(clip(x * scale + offset, low, high))`` (the cast truncates)."""

    kind: Literal["edm-uint8"] = "edm-uint8"
    scale: float = 127.5
    offset: float = 128.0
    low: int = 0
    high: int = 255


class ExtractorRef(Strict):
    """The network whose features a metric is computed on, pinned by the sha256 of its weights file."""

    id: str = Field(description="e.g. 'inception-2015-12-05' or an offline extractor id like 'resnet9w64-...'")
    sha256: str
    feature_dim: Optional[int] = Field(None, ge=1, description="None for LPIPS backbones (several feature maps)")
    input_resize: str = Field(description="how images reach the network: 'none' or 'clean-pil-bicubic-299'")

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not _EXTRACTOR_ID.fullmatch(v):
            raise ValueError(f"extractor id {v!r} must be 1-64 characters of letters, digits, '.', '_', '-'")
        if "fid" in v.lower():
            raise ValueError(f"extractor id {v!r} must not contain 'fid': only the Inception network makes FIDs")
        return v

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str) -> str:
        return _check_sha256(v)

    @property
    def is_inception(self) -> bool:
        return self.id == INCEPTION_ID


class ReferenceRef(Strict):
    """Reference statistics (mu, sigma and features of a data split), pinned by the sha256 of the stats file."""

    id: str
    sha256: str
    dataset_id: str
    num_images: int = Field(ge=2)

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str) -> str:
        return _check_sha256(v)


class EvalProtocol(Strict):
    """How a metric value was made. Two values may be compared only under equal protocols.

    ``kind='distribution'``: ``num_samples`` generated images from per-sample ``seeds`` (default
    ``0..num_samples-1``, as EDM), quantised to uint8, against reference statistics of a data
    ``split`` with a pinned feature extractor (FID / KID / IS / FD-* / KID-*).
    ``kind='paired'``: student vs teacher outputs from the same held-out noise seeds (MSE, LPIPS-*),
    ``split='heldout'``; the extractor is the LPIPS backbone for LPIPS and absent for MSE.
    """

    kind: Literal["distribution", "paired"] = "distribution"
    num_samples: int = Field(50_000, ge=2)
    seeds: Optional[SeedRange] = Field(None, description="per-sample seeds; default [0, num_samples)")
    quantization: Quantization = Quantization()
    image_space: Literal["uint8", "float"] = Field(
        "uint8", description="metrics computed on quantised uint8 images, or on the raw float outputs (paired only)")
    split: Literal["train", "test", "heldout"] = "train"
    reference: Optional[ReferenceRef] = None
    feature_extractor: Optional[ExtractorRef] = None
    pairs_version: Optional[str] = Field(None, description="paired: the held-out pair store both models were run on")
    kid_subsets: int = Field(100, ge=1)
    kid_subset_size: int = Field(1000, ge=2)
    kid_seed: int = 0
    is_splits: int = Field(10, ge=1)
    pr_k: int = Field(3, ge=1, description="precision / recall: k of the k-NN radii (Kynkaanniemi et al.: 3)")

    @model_validator(mode="before")
    @classmethod
    def _default_seeds(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("seeds") is None:
            n = data.get("num_samples", 50_000)
            if isinstance(n, int) and n >= 2:
                data = {**data, "seeds": {"start": 0, "stop": n}}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "EvalProtocol":
        if self.seeds is not None and len(self.seeds) != self.num_samples:
            raise ValueError(f"seeds {self.seeds.text()} hold {len(self.seeds)} seeds but num_samples is "
                             f"{self.num_samples}: one seed per sample")
        if self.kind == "distribution":
            if self.image_space != "uint8":
                raise ValueError("distribution metrics are computed on quantised uint8 images (image_space='uint8')")
            if self.reference is None or self.feature_extractor is None:
                raise ValueError("a distribution protocol needs reference statistics and a feature extractor")
            if self.split == "heldout":
                raise ValueError("a distribution protocol's split is the reference data split: 'train' or 'test'")
        else:
            if self.split != "heldout":
                raise ValueError("a paired protocol runs on held-out seeds: split must be 'heldout'")
            if self.reference is not None:
                raise ValueError("a paired protocol has no reference statistics")
        return self


def _fields_for(name: str) -> set[str]:
    """Protocol fields that cannot change a value of the metric called ``name`` (ignored when comparing)."""
    ignore = {"kid_subsets", "kid_subset_size", "kid_seed", "is_splits", "pr_k"}
    if name.startswith(("Precision-", "Recall-")):
        ignore -= {"pr_k"}
    if name == "KID" or name.startswith("KID-"):
        ignore -= {"kid_subsets", "kid_subset_size", "kid_seed"}
    if name == "IS":
        ignore -= {"is_splits"}
        ignore |= {"reference"}  # IS uses no reference statistics
    return ignore


class ImageMetric(Strict):
    """One value, its name, and the protocol it was made under."""

    name: str
    value: float
    std: Optional[float] = Field(None, description="KID: std over subsets; IS: std over splits")
    stderr: Optional[float] = Field(None, description="MSE, LPIPS: the standard error of the mean over the paired "
                                                      "samples (absent in reports written before it existed)")
    subject: str = Field(description="what was evaluated, e.g. 'student', 'teacher', 'test-split'")
    model_version: Optional[str] = None
    protocol: EvalProtocol

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        return drop_unset(handler(self), ("stderr",))

    @model_validator(mode="after")
    def _name_matches_protocol(self) -> "ImageMetric":
        p, n = self.protocol, self.name
        fx = p.feature_extractor
        if n in INCEPTION_METRICS:
            if p.kind != "distribution" or fx is None or not fx.is_inception:
                raise ValueError(f"{n} is reserved for the Inception network {INCEPTION_ID!r} under a distribution "
                                 f"protocol; features of {fx.id if fx else 'no extractor'!r} are reported as "
                                 f"FD-<extractor id> / KID-<extractor id>")
            return self
        m = re.fullmatch(r"(FD|KID|Precision|Recall)-(.+)", n)
        if m:
            if p.kind != "distribution" or fx is None:
                raise ValueError(f"{n} needs a distribution protocol with a feature extractor")
            if m.group(2) != fx.id:
                raise ValueError(f"metric {n} names extractor {m.group(2)!r} but the protocol's extractor is {fx.id!r}")
            if fx.is_inception and m.group(1) in ("FD", "KID"):
                raise ValueError(f"Inception features are reported as {'FID' if m.group(1) == 'FD' else 'KID'}, not {n}")
            return self
        if n in PAIRED_METRICS:
            if p.kind != "paired":
                raise ValueError(f"{n} compares student and teacher on the same noise: it needs a paired protocol")
            if n == "MSE" and fx is not None:
                raise ValueError("MSE uses no feature extractor: the protocol's feature_extractor must be None")
            if n.startswith("LPIPS-") and (fx is None or not fx.id.startswith(f"lpips-{n.split('-', 1)[1]}")):
                raise ValueError(f"{n} needs the protocol's feature_extractor to be the LPIPS backbone "
                                 f"'lpips-{n.split('-', 1)[1]}-...'")
            return self
        raise ValueError(f"unknown metric name {n!r}: use FID, KID, IS, FD-<extractor id>, KID-<extractor id>, "
                         f"Precision-<extractor id>, Recall-<extractor id>, MSE, LPIPS-vgg or LPIPS-alex")


class ImageMetricReport(Strict):
    """``metrics.json`` of an image evaluation: metric values, each with its protocol, and plots beside it."""

    format: Literal["kdm-image-metrics"] = "kdm-image-metrics"
    schema_version: int = SCHEMA_VERSION
    metrics: list[ImageMetric]
    plots: dict[str, str] = Field(default_factory=dict, description="name -> file name beside the report")
    notes: dict[str, Any] = Field(default_factory=dict, description="free-form context (timings, versions)")
    code_version: str
    created: str

    @model_validator(mode="after")
    def _unique(self) -> "ImageMetricReport":
        seen = set()
        for m in self.metrics:
            key = (m.name, m.subject)
            if key in seen:
                raise ValueError(f"metric {m.name} of subject {m.subject!r} appears twice")
            seen.add(key)
        return self

    def get(self, name: str, subject: str) -> ImageMetric:
        for m in self.metrics:
            if m.name == name and m.subject == subject:
                return m
        have = ", ".join(f"{m.name}/{m.subject}" for m in self.metrics) or "none"
        raise KeyError(f"no metric {name} for subject {subject!r} (have: {have})")


# ----------------------------------------------------------------------------- comparison

def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        if not obj and prefix:
            out[prefix[:-1]] = {}
        return out
    return {prefix[:-1]: obj}


def protocol_differences(a: EvalProtocol, b: EvalProtocol, ignore: set[str] = frozenset()) -> list[str]:
    """Dotted field paths whose values differ, as 'path: A != B' lines (fields under ``ignore`` skipped)."""
    fa, fb = _flatten(a.model_dump(mode="json")), _flatten(b.model_dump(mode="json"))
    lines = []
    for key in sorted(set(fa) | set(fb)):
        if key.split(".", 1)[0] in ignore:
            continue
        va, vb = fa.get(key, "<absent>"), fb.get(key, "<absent>")
        if va != vb:
            lines.append(f"{key}: {va!r} != {vb!r}")
    return lines


def check_comparable(a: Union[EvalProtocol, ImageMetric], b: Union[EvalProtocol, ImageMetric]) -> None:
    """Raise ``ProtocolMismatch`` unless ``a`` and ``b`` were made under the same protocol.

    Accepts two protocols or two metrics. For metrics, the names must also match, and protocol
    knobs that cannot change that metric (e.g. KID subsets for an FD) are not compared.
    """
    ignore: set[str] = set()
    problems: list[str] = []
    if isinstance(a, ImageMetric) != isinstance(b, ImageMetric):
        raise TypeError("check_comparable takes two EvalProtocols or two ImageMetrics")
    if isinstance(a, ImageMetric):
        if a.name != b.name:
            problems.append(f"name: {a.name!r} != {b.name!r}")
        ignore = _fields_for(a.name) & _fields_for(b.name)
        pa, pb = a.protocol, b.protocol
    else:
        pa, pb = a, b
    problems += protocol_differences(pa, pb, ignore)
    if problems:
        raise ProtocolMismatch("refusing to compare values made under different evaluation protocols; "
                               "differing fields:\n  - " + "\n  - ".join(problems))


# ----------------------------------------------------------------------------- artifacts

class ReferenceStatsManifest(Strict):
    """``<root>/reference-stats/<id>/``: ``stats.npz`` (mu, sigma; float64), ``features.npy`` (float32)."""

    format: Literal["kdm-reference-stats"] = "kdm-reference-stats"
    schema_version: int = SCHEMA_VERSION
    id: str
    dataset_id: str
    split: Literal["train", "test"]
    num_images: int = Field(ge=2)
    images_sha256: str = Field(description="sha256 over the uint8 image array bytes (N, C, H, W order)")
    extractor: ExtractorRef
    stats_file: str = "stats.npz"
    stats_sha256: str
    features_file: str = "features.npy"
    features_sha256: str
    code_version: str
    created: str

    def ref(self) -> ReferenceRef:
        return ReferenceRef(id=self.id, sha256=self.stats_sha256, dataset_id=self.dataset_id,
                            num_images=self.num_images)


class ClassifierTrainConfig(Strict):
    """How the pipeline trains its own CIFAR classifiers (the evaluation's feature extractor and the
    lpips-own distance's network): SGD with Nesterov momentum, one-cycle learning rate, label smoothing,
    crops + flips, bf16 autocast on CUDA, deterministic given the seed. Subclasses name the network."""

    width: int = Field(64, ge=1)
    num_classes: int = Field(10, ge=2)
    epochs: int = Field(24, ge=1)
    batch_size: int = Field(512, ge=1)
    lr: float = Field(0.4, gt=0)
    warmup_fraction: float = Field(0.25, ge=0, lt=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    label_smoothing: float = Field(0.2, ge=0, lt=1)
    crop_padding: int = Field(4, ge=0)
    flip: bool = True
    precision: Literal["bf16", "fp32"] = Field("bf16", description="autocast dtype on CUDA; CPU always runs fp32")
    seed: int = 0
    eval_batch_size: int = Field(1000, ge=1)


class ExtractorTrainConfig(ClassifierTrainConfig):
    """Offline feature extractor: a ResNet-9-style CIFAR classifier (Page's DAWNBench net).

    Stages of ``width, 2w, 4w, 8w`` channels; the features are the 8w-d global max pool before the
    classifier (512-d at the default width). Recipe: SGD Nesterov (momentum 0.9, weight decay 5e-4 on
    the mean loss), one-cycle learning rate (linear 0 -> ``lr`` over ``warmup_fraction`` of the steps,
    then linear to 0), label smoothing 0.2, random crops with 4 px reflect padding and horizontal
    flips, batch 512, 24 epochs, bf16 autocast on CUDA (fp32 on CPU). Measured on the CIFAR-10 JPEG
    archive (shared/data) on one H200: 90.6 % test accuracy after 18 epochs (13.7 s), 91.0 % after
    24 (18.1 s), 91.1 % after 30; label smoothing 0 / 0.1, lr 0.2 / 0.8, fp32, weight decay 1e-3,
    warm-up 0.15 and batch 256 all stay within 90.3-90.8 % at 18 epochs.
    """

    arch: Literal["resnet9"] = "resnet9"
    width: int = Field(64, ge=1)
    epochs: int = Field(24, ge=1)
    lr: float = Field(0.4, gt=0)
    seed: int = 0

    @property
    def feature_dim(self) -> int:
        return 8 * self.width


class TrainedClassifierFields(Strict):
    """What the manifest of a CIFAR classifier the pipeline trained records besides its config (the
    feature extractor's and the lpips-own network's)."""

    image_shape: tuple[int, int, int] = Field(description="(C, H, W) the network was trained on")
    mean: tuple[float, ...] = Field(description="per-channel mean of the training images, in [0, 1] units")
    std: tuple[float, ...]
    weights_file: str = "weights.safetensors"
    weights_sha256: str
    dataset_id: str
    train_images: int
    train_sha256: str = Field(description="sha256 over the training image and label array bytes")
    test_images: int = 0
    test_accuracy: Optional[float] = None
    training_seed: int
    train_seconds: float
    device: str = Field(description="where it was trained: weights are bitwise reproducible on the same "
                                    "device type and software only")
    torch_version: str
    code_version: str
    created: str


class FeatureExtractorManifest(TrainedClassifierFields):
    """``weights.safetensors`` + ``config.json`` + ``manifest.json`` (written last) of an offline extractor."""

    format: Literal["kdm-feature-extractor"] = "kdm-feature-extractor"
    schema_version: int = SCHEMA_VERSION
    id: str = Field(description="content-addressed over recipe, config, training data and seed")
    config: ExtractorTrainConfig
    feature_dim: int

    @property
    def version(self) -> str:
        return self.id

    def ref(self) -> ExtractorRef:
        return ExtractorRef(id=self.id, sha256=self.weights_sha256, feature_dim=self.feature_dim, input_resize="none")
