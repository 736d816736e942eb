"""Train, store and load the perceptual network behind the training distance ``lpips-own``.

The network (``models.perceptual.PerceptualConvNet``, recipe ``storage_schemas.perceptual.
PerceptualNetTrainConfig``) is a small VGG-style CIFAR classifier trained on the dataset's train split
with the evaluation extractor's optimisation code (``pipeline.evaluation.features.train_network``:
deterministic given the seed, bf16 autocast and channels_last on CUDA), but it is another network:
another architecture (plain conv stages, average pooling), another seed, its own weights. A student
trained with ``lpips-own`` is therefore never trained on the features its FD / KID / precision /
recall are measured with; ``check_independent`` refuses a perceptual network that shares an id,
weights or training seed with the evaluation extractor, and ``load_perceptual_net`` refuses an
extractor artifact outright.

Artifact (``pipeline.storage.artifacts``; ``out`` any fsspec URL): ``weights.safetensors``,
``config.json`` (PerceptualNetTrainConfig) and ``manifest.json`` (PerceptualNetManifest: id, weights
sha256, test accuracy, seed, data hash, device, the extractor it was checked against), written last.
Re-running with the same recipe and data finds the artifact and returns its manifest.

  python -m pipeline.training.perceptual --dataset runs/cifar10 --out runs/perceptual \\
      --extractor runs/extractor --device cuda
"""
from __future__ import annotations

import argparse
import time
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load as st_load

from models.perceptual import OwnLPIPS, PerceptualConvNet
from storage_schemas import code_version, recipe_version, stable_hash, utc_now
from storage_schemas.perceptual import (PERCEPTUAL_FORMAT, PerceptualNetManifest, PerceptualNetRef,
                                        PerceptualNetTrainConfig, PerceptualStageConfig)
from storage_schemas.protocol import ExtractorRef, FeatureExtractorManifest

from pipeline.devices import resolve_device
from pipeline.errors import ArtifactMissing, KDMError
from pipeline.evaluation import features as fx
from pipeline.storage import artifacts

WEIGHTS = "weights.safetensors"
CONFIG = "config.json"
TRAIN_HINT = ("train one with pipeline.training.perceptual.train_perceptual_net(dataset_uri, cfg, out) "
              "(`python -m pipeline.training.perceptual --dataset DATASET --out URI --extractor EXTRACTOR`)")


def build_network(cfg: PerceptualNetTrainConfig, channels: int = 3) -> PerceptualConvNet:
    return PerceptualConvNet(cfg.width, cfg.num_classes, channels)


def perceptual_net_version(cfg: PerceptualNetTrainConfig, train_sha256: str) -> str:
    h = stable_hash(recipe_version(), "perceptual-net", cfg.model_dump(exclude={"eval_batch_size"}), train_sha256,
                    length=12)
    return f"pnet-{cfg.arch}w{cfg.width}-{h}"


# ----------------------------------------------------------------------------- independence

def _extractor_ref(extractor) -> ExtractorRef:
    if isinstance(extractor, FeatureExtractorManifest):
        return extractor.ref()
    if isinstance(extractor, ExtractorRef):
        return extractor
    ref = getattr(extractor, "ref", None)
    if isinstance(ref, ExtractorRef):
        return ref
    raise TypeError(f"expected an extractor manifest, ExtractorRef or loaded extractor, got {type(extractor).__name__}")


def check_independent(net: PerceptualNetManifest | PerceptualNetRef, extractor,
                      extractor_seed: Optional[int] = None) -> None:
    """Refuse (KDMError) a perceptual network that is, or shares weights or a training seed with, the
    evaluation's feature extractor (``extractor``: its manifest, ExtractorRef or loaded FeatureExtractor)."""
    ref = _extractor_ref(extractor)
    nid, nsha = (net.id, net.weights_sha256) if isinstance(net, PerceptualNetManifest) else (net.id, net.sha256)
    if nid == ref.id or nsha == ref.sha256:
        raise KDMError(f"the training distance's network {nid} is the evaluation's feature extractor {ref.id} "
                       f"(sha256 {ref.sha256[:12]}): a student must never be trained on the metric's own features; "
                       f"{TRAIN_HINT}")
    if extractor_seed is None and isinstance(extractor, FeatureExtractorManifest):
        extractor_seed = extractor.training_seed
    if extractor_seed is None:
        manifest = getattr(extractor, "manifest", None)
        extractor_seed = getattr(manifest, "training_seed", None)
    net_seed = net.training_seed if isinstance(net, PerceptualNetManifest) else None
    if net_seed is not None and extractor_seed is not None and net_seed == extractor_seed:
        raise KDMError(f"the perceptual network {nid} was trained with seed {net_seed}, the evaluation extractor "
                       f"{ref.id} too: the same seed gives both the same data order and augmentations; retrain the "
                       f"perceptual network with another seed (PerceptualNetTrainConfig.seed)")


# ----------------------------------------------------------------------------- training

def read_perceptual_manifest(url: str) -> PerceptualNetManifest:
    """The manifest of the perceptual network at ``url``; an extractor artifact or nothing there is refused."""
    mf = artifacts.join(url, artifacts.MANIFEST)
    if not artifacts.exists(mf):
        raise ArtifactMissing(f"no perceptual network at {url} (no {artifacts.MANIFEST}); distance 'lpips-own' loads its "
                       f"weights from train.perceptual_net: {TRAIN_HINT}")
    raw = artifacts.read_json(mf)
    fmt = raw.get("format") if isinstance(raw, dict) else None
    if fmt == "kdm-feature-extractor":
        raise KDMError(f"{url} holds the evaluation's feature extractor ({raw.get('id')}), not a perceptual network: "
                       f"a student must never be trained on the metric's own features; {TRAIN_HINT}")
    if fmt != PERCEPTUAL_FORMAT:
        raise KDMError(f"{url} holds a {fmt!r} artifact, not a perceptual network ({PERCEPTUAL_FORMAT}); {TRAIN_HINT}")
    return PerceptualNetManifest.model_validate(raw)


def train_perceptual_net_arrays(images: np.ndarray, labels: np.ndarray, cfg: PerceptualNetTrainConfig, out: str, *,
                                test_images: Optional[np.ndarray] = None, test_labels: Optional[np.ndarray] = None,
                                dataset_id: Optional[str] = None, extractor: Optional[FeatureExtractorManifest] = None,
                                device: str = "cpu", progress: bool = True) -> PerceptualNetManifest:
    """Train (or find already trained) the perceptual network at ``out`` from uint8 arrays (N, C, H, W).

    ``extractor``: the evaluation extractor's manifest; the seeds are checked before training and the
    weights after, and the manifest records it (``independent_of``).
    """
    images, labels = fx._check_images(images, labels, cfg.num_classes, "training")
    if extractor is not None and extractor.training_seed == cfg.seed:
        raise KDMError(f"perceptual network seed {cfg.seed} equals the evaluation extractor {extractor.id}'s training "
                       f"seed: choose another PerceptualNetTrainConfig.seed")
    train_sha = fx.data_sha256(images, labels)
    version = perceptual_net_version(cfg, train_sha)
    if artifacts.check_target(out, version, read_perceptual_manifest):
        m = read_perceptual_manifest(out)
        if extractor is not None:
            check_independent(m, extractor)
        return m
    net, info = fx.train_network(images, labels, cfg, device=device, progress=progress, build=build_network,
                                 desc="perceptual net")
    dev = next(net.parameters()).device
    test_acc, n_test = None, 0
    if test_images is not None:
        test_images, test_labels = fx._check_images(test_images, test_labels, cfg.num_classes, "test")
        if test_images.shape[1:] != images.shape[1:]:
            raise KDMError(f"test images {test_images.shape[1:]} differ in shape from training images "
                           f"{images.shape[1:]}")
        test_acc = fx.accuracy(net, test_images, test_labels, dev, cfg.eval_batch_size)
        n_test = len(test_images)
    weights = fx._weights_bytes(net)
    manifest = PerceptualNetManifest(
        id=version, config=cfg, layer_channels=cfg.layer_channels, image_shape=tuple(images.shape[1:]),
        mean=info["mean"], std=info["std"], weights_sha256=artifacts.sha256_bytes(weights),
        dataset_id=dataset_id or f"sha256:{train_sha[:16]}", train_images=len(images), train_sha256=train_sha,
        test_images=n_test, test_accuracy=test_acc, training_seed=cfg.seed, train_seconds=info["train_seconds"],
        device=fx._device_name(dev), torch_version=torch.__version__,
        independent_of=extractor.ref() if extractor is not None else None,
        code_version=code_version(), created=utc_now())
    if extractor is not None:
        check_independent(manifest, extractor)
    tmp = artifacts.begin(out, fresh=True)
    artifacts.write_bytes(artifacts.join(tmp, WEIGHTS), weights)
    artifacts.write_json(artifacts.join(tmp, CONFIG), cfg)
    artifacts.write_json(artifacts.join(tmp, artifacts.MANIFEST), manifest)
    artifacts.commit(out)
    return manifest


def evenly_spaced(n: int, k: Optional[int]) -> np.ndarray:
    """Indices of an evenly spaced subset of k of n items (all of them when k is None or >= n)."""
    if k is None or k >= n:
        return np.arange(n)
    return np.linspace(0, n - 1, k).round().astype(np.int64)


def train_perceptual_net(dataset_uri: str, cfg: PerceptualNetTrainConfig, out: str, *,
                         extractor_uri: Optional[str] = None, device: str = "cuda", test_split: Optional[str] = "test",
                         train_images: Optional[int] = None, progress: bool = True) -> PerceptualNetManifest:
    """``train_perceptual_net_arrays`` on the 'train' split of a prepared dataset (``pipeline.data.datasets``;
    an evenly spaced subset of ``train_images`` when given), tested on ``test_split`` when the dataset has
    it, checked against the evaluation extractor at ``extractor_uri`` when given."""
    ds = fx._open_image_dataset(dataset_uri)
    x, y = fx.dataset_split_arrays(ds, "train")
    idx = evenly_spaced(len(x), train_images)
    x, y = x[idx], y[idx]
    xt = yt = None
    splits = getattr(getattr(ds, "manifest", None), "splits", None)
    if test_split and (splits is None or test_split in splits):
        xt, yt = fx.dataset_split_arrays(ds, test_split)
    ext = fx.read_extractor_manifest(extractor_uri) if extractor_uri else None
    return train_perceptual_net_arrays(x, y, cfg, out, test_images=xt, test_labels=yt,
                                       dataset_id=fx.dataset_id_of(ds, dataset_uri), extractor=ext, device=device,
                                       progress=progress)


# ----------------------------------------------------------------------------- stage

def perceptual_stage_version(dataset_content_hash: str, cfg: PerceptualStageConfig) -> str:
    """Where the stage keeps the network: ``<root>/perceptual-nets/<this>`` (no work done to compute it)."""
    return "pnet-" + stable_hash(recipe_version(), "perceptual-net-stage", dataset_content_hash, cfg.train,
                                 cfg.train_images)


def perceptual_summary(out: str) -> dict:
    """Small dict of a committed perceptual network: uri, id, sha256, test accuracy, training images, device."""
    m = read_perceptual_manifest(out)
    return {"uri": out, "id": m.id, "sha256": m.weights_sha256, "test_accuracy": m.test_accuracy,
            "train_images": m.train_images, "trained_on": m.device}


# ----------------------------------------------------------------------------- loading

def load_perceptual_net(url: str, device: str | torch.device = "cpu") -> tuple[PerceptualConvNet, PerceptualNetManifest]:
    """The frozen network (eval mode, verified against the manifest's sha256) and its manifest."""
    m = read_perceptual_manifest(url)
    data = artifacts.read_verified(artifacts.join(url, m.weights_file), m.weights_sha256, "perceptual network")
    net = build_network(m.config, m.image_shape[0])
    net.load_state_dict(st_load(data))
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    return net.to(dev).eval().requires_grad_(False), m


def load_perceptual_distance(url: Optional[str], device: str | torch.device = "cpu",
                             extractor=None) -> OwnLPIPS:
    """``OwnLPIPS`` on the network at ``url`` (the student's ``train.perceptual_net``); with ``extractor``
    (the evaluation extractor's manifest / ref) the pairing is checked first."""
    if not url:
        raise KDMError("distance 'lpips-own' needs train.perceptual_net, the URI of the pipeline's perceptual "
                       f"network; {TRAIN_HINT}")
    net, m = load_perceptual_net(url, device)
    if extractor is not None:
        check_independent(m, extractor)
    return OwnLPIPS(net, m.id, m.weights_sha256)


def perceptual_net_ref(url: Optional[str]) -> PerceptualNetRef:
    """The id and weights sha256 of the network at ``url`` (cheap: reads the manifest only)."""
    if not url:
        raise KDMError("distance 'lpips-own' needs train.perceptual_net, the URI of the pipeline's perceptual "
                       f"network; {TRAIN_HINT}")
    return read_perceptual_manifest(url).ref()


# ----------------------------------------------------------------------------- command line

def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipeline.training.perceptual", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="a dataset prepared by pipeline.data.datasets")
    p.add_argument("--out", required=True, help="perceptual network artifact directory (any fsspec URL)")
    p.add_argument("--extractor", default=None, help="the evaluation extractor artifact, to check independence")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="PerceptualNetTrainConfig field")
    p.add_argument("--device", default="cuda")
    p.add_argument("-q", "--quiet", action="store_true")
    a = p.parse_args(argv)
    from pipeline import presets
    cfg = presets.validate(PerceptualNetTrainConfig, presets.apply_sets({}, a.set), "perceptual network options")
    t0 = time.time()
    m = train_perceptual_net(a.dataset, cfg, a.out, extractor_uri=a.extractor, device=a.device, progress=not a.quiet)
    acc = f"{m.test_accuracy:.4f}" if m.test_accuracy is not None else "n/a"
    print(f"perceptual network {m.id}: test accuracy {acc}, trained in {m.train_seconds:.0f} s on {m.device} "
          f"({time.time() - t0:.0f} s this call), sha256 {m.weights_sha256[:16]} at {a.out}", flush=True)


if __name__ == "__main__":
    main()
