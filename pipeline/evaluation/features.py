"""Offline feature extractor for image metrics: a small CIFAR classifier the pipeline trains itself.

The standard Inception-v3 weights cannot be downloaded on offline machines, so distribution metrics
that must run anywhere use the penultimate features of a ResNet-9-style classifier trained here
(``storage_schemas.protocol.ExtractorTrainConfig`` documents the recipe: Page's DAWNBench ResNet-9,
SGD Nesterov, one-cycle LR, label smoothing 0.2, crops + flips, batch 512, 24 epochs, bf16 on CUDA).
On CIFAR-10 (the JPEG archive in shared/data) it reached 91.0 % test accuracy in 18 s of training on
one H200 (``bench/cifar10_mini.py --stages dataset,extractor`` trains it and checks accuracy, FD of the
test split and of noise against the train split); an H100 should take somewhat longer. Numbers made with it are reported as
``FD-<extractor id>`` / ``KID-<extractor id>``, never as FID.

Artifact (``pipeline.storage.artifacts``): ``weights.safetensors`` (network incl. its input normalisation),
``config.json`` (ExtractorTrainConfig) and ``manifest.json`` (FeatureExtractorManifest: id, weights
sha256, test accuracy, training seed, data hash, device), written last.

Determinism: the initial weights come from ``torch.manual_seed(cfg.seed)`` on the CPU, and the data
order, crops and flips of epoch ``e`` from a CPU generator seeded with ``(cfg.seed, e)``; cuDNN runs in
deterministic mode. The same seed, data, device type and software (torch / CUDA / cuDNN versions)
give bitwise identical weights (checked on the CPU by tests/test_features.py and on an H200 by the
bench's ``--determinism-check``); across devices or software versions they differ slightly, which is
why every protocol pins the extractor by the sha256 of its weights as well as by its id.

Inputs everywhere are uint8 images ``(N, C, H, W)`` (float tensors holding values in [0, 255] are
accepted too), so ``load_extractor(url)`` also serves as clean-fid's ``custom_feat_extractor``; pass
clean-fid ``custom_fn_resize=lambda x: x`` so the images keep the resolution the extractor was
trained on (it refuses any other size).
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn
from tqdm import tqdm

from storage_schemas import code_version, recipe_version, stable_hash, utc_now
from storage_schemas.protocol import ExtractorRef, ExtractorTrainConfig, FeatureExtractorManifest

from pipeline.storage import artifacts
from pipeline.devices import resolve_device
from pipeline.errors import KDMError

WEIGHTS = "weights.safetensors"
CONFIG = "config.json"


# ----------------------------------------------------------------------------- network

def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(c, c), _conv_bn(c, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNet9(nn.Module):
    """ResNet-9 (DAWNBench): prep(w) -> [conv(2w), pool, res] -> [conv(4w), pool] -> [conv(8w), pool, res]
    -> global max pool (the 8w-d features) -> linear (no bias) * 0.125.

    ``forward`` / ``features`` take float images in [0, 255]; the per-channel normalisation (training
    set mean and std, in [0, 255] units) is a buffer of the network and part of its weights file.
    """

    def __init__(self, width: int = 64, num_classes: int = 10, channels: int = 3):
        super().__init__()
        w = width
        self.register_buffer("mean", torch.full((1, channels, 1, 1), 127.5))
        self.register_buffer("std", torch.full((1, channels, 1, 1), 127.5))
        self.prep = _conv_bn(channels, w)
        self.layer1 = nn.Sequential(_conv_bn(w, 2 * w), nn.MaxPool2d(2), _Residual(2 * w))
        self.layer2 = nn.Sequential(_conv_bn(2 * w, 4 * w), nn.MaxPool2d(2))
        self.layer3 = nn.Sequential(_conv_bn(4 * w, 8 * w), nn.MaxPool2d(2), _Residual(8 * w))
        self.fc = nn.Linear(8 * w, num_classes, bias=False)
        self.logit_scale = 0.125

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        return x.amax(dim=(2, 3))   # global max pool; amax's backward is deterministic, adaptive pooling's is not

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x)) * self.logit_scale


def build_network(cfg: ExtractorTrainConfig, channels: int = 3) -> ResNet9:
    return ResNet9(cfg.width, cfg.num_classes, channels)


# ----------------------------------------------------------------------------- data helpers

def _check_images(images: Any, labels: Any, num_classes: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise KDMError(f"{name} images must be a uint8 array (N, C, H, W), got {images.dtype} {images.shape}")
    if labels.shape != (len(images),):
        raise KDMError(f"{name} labels must have shape ({len(images)},), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise KDMError(f"{name} labels must be integers, got {labels.dtype}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise KDMError(f"{name} labels must lie in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")
    return np.ascontiguousarray(images), labels.astype(np.int64)


def data_sha256(images: np.ndarray, labels: Optional[np.ndarray] = None) -> str:
    """sha256 over the raw bytes of a C-contiguous image array (then the labels as int64, when given)."""
    import hashlib
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images).data)
    if labels is not None:
        h.update(np.ascontiguousarray(np.asarray(labels, dtype=np.int64)).data)
    return h.hexdigest()


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    state = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def augment(x: torch.Tensor, g: torch.Generator, padding: int, flip: bool) -> torch.Tensor:
    """Random crops (reflect padding) and horizontal flips of a uint8 batch -> float [0, 255].

    The random numbers come from the CPU generator ``g`` (same values on every device).
    """
    b, _, h, w = x.shape
    x = x.float()
    if padding:
        dy = torch.randint(0, 2 * padding + 1, (b,), generator=g).to(x.device)
        dx = torch.randint(0, 2 * padding + 1, (b,), generator=g).to(x.device)
        xp = F.pad(x, (padding,) * 4, mode="reflect")
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]
        x = xp[torch.arange(b, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    if flip:
        f = (torch.rand(b, generator=g) < 0.5).to(x.device)
        x = torch.where(f[:, None, None, None], x.flip(3), x)
    return x.contiguous()


@contextlib.contextmanager
def _deterministic_cudnn():
    prev = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev


def _lr_at(step: int, total: int, cfg: ExtractorTrainConfig) -> float:
    warm = max(1, round(cfg.warmup_fraction * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * max(0.0, (total - step) / max(1, total - warm))


def _autocast(dev: torch.device, cfg: ExtractorTrainConfig):
    on = dev.type == "cuda" and cfg.precision == "bf16"
    return torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=on)


@torch.no_grad()
def accuracy(net: ResNet9, images: np.ndarray, labels: np.ndarray, device: torch.device | str = "cpu",
             batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``net`` (eval mode, fp32) on uint8 images."""
    dev = torch.device(device)
    was = net.training
    net.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i:i + batch_size]).to(dev).float()
        pred = net(x).argmax(1).cpu().numpy()
        correct += int((pred == labels[i:i + batch_size]).sum())
    net.train(was)
    return correct / max(1, len(images))


# ----------------------------------------------------------------------------- training

def extractor_version(cfg: ExtractorTrainConfig, train_sha256: str) -> str:
    h = stable_hash(recipe_version(), "feature-extractor", cfg.model_dump(exclude={"eval_batch_size"}), train_sha256,
                    length=12)
    return f"{cfg.arch}w{cfg.width}-{h}"


def read_extractor_manifest(url: str) -> FeatureExtractorManifest:
    return artifacts.read_model(artifacts.join(url, artifacts.MANIFEST), FeatureExtractorManifest)


def train_network(images: np.ndarray, labels: np.ndarray, cfg: ExtractorTrainConfig, device: str = "cpu",
                  progress: bool = True, build: Optional[Any] = None,
                  desc: str = "feature extractor") -> tuple[ResNet9, dict]:
    """Train the classifier in memory; returns (network on ``device`` in eval mode, info dict).

    ``build(cfg, channels)`` makes the initial network (default ``build_network``: the ResNet-9); any
    classifier with ``mean`` / ``std`` buffers and float [0, 255] inputs trains with the same recipe
    (``pipeline.training.perceptual`` trains the perceptual network this way, from its own config).
    """
    images, labels = _check_images(images, labels, cfg.num_classes, "training")
    n, c, h, w = images.shape
    if n < 2:
        raise KDMError(f"need at least 2 training images, got {n}")
    dev = resolve_device(device)
    mean = images.mean(axis=(0, 2, 3), dtype=np.float64) / 255.0
    std = images.std(axis=(0, 2, 3), dtype=np.float64) / 255.0
    torch.manual_seed(cfg.seed)
    net = (build or build_network)(cfg, c)
    with torch.no_grad():
        net.mean.copy_(torch.tensor(mean * 255.0, dtype=torch.float32).view(1, c, 1, 1))
        net.std.copy_(torch.tensor(np.maximum(std, 1e-3) * 255.0, dtype=torch.float32).view(1, c, 1, 1))
    net = net.to(dev)
    if dev.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                          weight_decay=cfg.weight_decay)
    bs = min(cfg.batch_size, n)
    steps_per_epoch = n // bs   # drop the ragged last batch: every step sees a full batch
    total = cfg.epochs * steps_per_epoch
    x_all = torch.from_numpy(images).to(dev)
    y_all = torch.from_numpy(labels).to(dev)
    t0 = time.time()
    step, last_loss = 0, float("nan")
    net.train()
    with _deterministic_cudnn():
        bar = tqdm(range(cfg.epochs), desc=desc, disable=not progress, mininterval=1.0)
        for epoch in bar:
            g = _epoch_generator(cfg.seed, epoch)
            perm = torch.randperm(n, generator=g)
            loss_sum = torch.zeros((), device=dev)
            for i in range(steps_per_epoch):
                idx = perm[i * bs:(i + 1) * bs].to(dev)
                x = augment(x_all[idx], g, cfg.crop_padding, cfg.flip)
                if dev.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                for group in opt.param_groups:
                    group["lr"] = _lr_at(step, total, cfg)
                with _autocast(dev, cfg):
                    logits = net(x)
                loss = F.cross_entropy(logits.float(), y_all[idx], label_smoothing=cfg.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.detach()
                step += 1
            last_loss = float(loss_sum) / steps_per_epoch
            if not math.isfinite(last_loss):
                raise KDMError(f"{desc} training diverged in epoch {epoch} (loss {last_loss}); "
                               f"lower lr={cfg.lr}")
            bar.set_postfix(loss=f"{last_loss:.4f}")
    net.eval()
    info = {"train_seconds": time.time() - t0, "final_loss": last_loss, "mean": tuple(float(v) for v in mean),
            "std": tuple(float(v) for v in std), "steps": total}
    return net, info


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(dev)}"
    return "cpu"


def _weights_bytes(net: nn.Module) -> bytes:
    state = {k: v.detach().to("cpu", memory_format=torch.contiguous_format).contiguous().float()
             for k, v in net.state_dict().items() if v.is_floating_point()}
    state.update({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items() if not v.is_floating_point()})
    return st_save(state)


def weights_sha256(net: nn.Module) -> str:
    """sha256 of the safetensors bytes ``train_extractor`` would write for ``net`` (to check determinism)."""
    return artifacts.sha256_bytes(_weights_bytes(net))


def train_extractor(images: np.ndarray, labels: np.ndarray, cfg: ExtractorTrainConfig, out: str, *,
                    test_images: Optional[np.ndarray] = None, test_labels: Optional[np.ndarray] = None,
                    dataset_id: Optional[str] = None, device: str = "cpu",
                    progress: bool = True) -> FeatureExtractorManifest:
    """Train (or find already trained) the offline extractor at ``out`` from uint8 arrays.

    ``images``: (N, C, H, W) uint8, ``labels``: (N,) ints in 0..num_classes-1. The test split, when
    given, only measures ``test_accuracy``; it does not enter the artifact id.
    """
    images, labels = _check_images(images, labels, cfg.num_classes, "training")
    train_sha = data_sha256(images, labels)
    version = extractor_version(cfg, train_sha)
    if artifacts.check_target(out, version, read_extractor_manifest):
        return read_extractor_manifest(out)
    net, info = train_network(images, labels, cfg, device=device, progress=progress)
    dev = next(net.parameters()).device
    test_acc, n_test = None, 0
    if test_images is not None:
        test_images, test_labels = _check_images(test_images, test_labels, cfg.num_classes, "test")
        if test_images.shape[1:] != images.shape[1:]:
            raise KDMError(f"test images {test_images.shape[1:]} differ in shape from training images "
                           f"{images.shape[1:]}")
        test_acc = accuracy(net, test_images, test_labels, dev, cfg.eval_batch_size)
        n_test = len(test_images)
    weights = _weights_bytes(net)
    tmp = artifacts.begin(out, fresh=True)
    artifacts.write_bytes(artifacts.join(tmp, WEIGHTS), weights)
    artifacts.write_json(artifacts.join(tmp, CONFIG), cfg)
    manifest = FeatureExtractorManifest(
        id=version, config=cfg, feature_dim=cfg.feature_dim, image_shape=tuple(images.shape[1:]),
        mean=info["mean"], std=info["std"], weights_sha256=artifacts.sha256_bytes(weights),
        dataset_id=dataset_id or f"sha256:{train_sha[:16]}", train_images=len(images), train_sha256=train_sha,
        test_images=n_test, test_accuracy=test_acc, training_seed=cfg.seed, train_seconds=info["train_seconds"],
        device=_device_name(dev), torch_version=torch.__version__, code_version=code_version(), created=utc_now())
    artifacts.write_json(artifacts.join(tmp, artifacts.MANIFEST), manifest)
    artifacts.commit(out)
    return manifest


# ----------------------------------------------------------------------------- dataset URLs

def _open_image_dataset(url: str):
    try:
        from pipeline.data.datasets import open_image_dataset
    except ImportError as e:
        raise KDMError(f"reading the prepared image dataset {url} needs pipeline.data.datasets.open_image_dataset "
                       f"({e}); pass the arrays directly (train_extractor(images, labels, ...)) meanwhile") from None
    return open_image_dataset(url)


def dataset_split_arrays(ds: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, C, H, W), labels) of one split of an opened image dataset.

    Accepts what ``pipeline.data.datasets.open_image_dataset`` returns if it offers one of: a method
    ``arrays(split)`` or ``load(split)`` returning ``(images, labels)`` or a mapping with keys
    ``images`` and ``labels``; or item access ``ds[split]`` returning the same.
    """
    got: Any = None
    for name in ("arrays", "load"):
        fn = getattr(ds, name, None)
        if callable(fn):
            got = fn(split)
            break
    else:
        if hasattr(ds, "__getitem__"):
            got = ds[split]
    if isinstance(got, dict) and "images" in got and "labels" in got:
        got = (got["images"], got["labels"])
    if isinstance(got, (tuple, list)) and len(got) == 2:
        return np.asarray(got[0]), np.asarray(got[1])
    raise KDMError(f"cannot read split {split!r} from {type(ds).__name__}: expected arrays(split) / load(split) / "
                   f"[split] returning (images, labels) or {{'images', 'labels'}}")


def dataset_id_of(ds: Any, url: str) -> str:
    for attr in ("version", "id"):
        v = getattr(ds, attr, None)
        if isinstance(v, str) and v:
            return v
    m = getattr(ds, "manifest", None)
    for attr in ("version", "id"):
        v = getattr(m, attr, None)
        if isinstance(v, str) and v:
            return v
    return str(url)


def train_extractor_from_dataset(dataset_url: str, cfg: ExtractorTrainConfig, out: str, *, device: str = "cuda",
                                 test_split: Optional[str] = "test", progress: bool = True) -> FeatureExtractorManifest:
    """``train_extractor`` on the 'train' split of a prepared dataset (``pipeline.data.datasets``), tested on ``test_split``."""
    ds = _open_image_dataset(dataset_url)
    x, y = dataset_split_arrays(ds, "train")
    xt = yt = None
    if test_split:
        xt, yt = dataset_split_arrays(ds, test_split)
    return train_extractor(x, y, cfg, out, test_images=xt, test_labels=yt, dataset_id=dataset_id_of(ds, dataset_url),
                           device=device, progress=progress)


# ----------------------------------------------------------------------------- loading

class FeatureExtractor(nn.Module):
    """uint8 images (N, C, H, W) -> penultimate features (N, feature_dim), float32, no gradients.

    Float tensors holding values in [0, 255] are accepted as well (clean-fid passes those). Images of
    another shape than the training images are refused: features of resized inputs are not comparable.
    """

    def __init__(self, net: ResNet9, manifest: FeatureExtractorManifest):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.manifest = manifest
        self.id = manifest.id
        self.sha256 = manifest.weights_sha256
        self.feature_dim = manifest.feature_dim
        self.image_shape = tuple(manifest.image_shape)

    @property
    def ref(self) -> ExtractorRef:
        return self.manifest.ref()

    def train(self, mode: bool = True) -> "FeatureExtractor":
        return super().train(False)   # BatchNorm always uses its running statistics

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"extractor {self.id} takes images (N, {', '.join(map(str, self.image_shape))}), got "
                             f"{tuple(x.shape)}; with clean-fid pass custom_fn_resize=lambda x: x (no resizing)")
        dev = self.net.mean.device
        return x.to(dev).float()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(self._prepare(x)).float()

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self._prepare(x)).float()


def load_extractor(url: str, device: str = "cpu") -> FeatureExtractor:
    """Load an extractor artifact, verifying its weights against the manifest's sha256."""
    manifest = read_extractor_manifest(url)
    data = artifacts.read_verified(artifacts.join(url, manifest.weights_file), manifest.weights_sha256,
                                   "extractor")
    net = build_network(manifest.config, manifest.image_shape[0])
    net.load_state_dict(st_load(data))
    return FeatureExtractor(net, manifest).to(resolve_device(device))
