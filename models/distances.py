"""Image distances d(x, y) for the reconstruction and prediction losses of KDM (paper Eq. 4 and 6).

Every distance takes two image batches (B, C, H, W) in [-1, 1] and returns one value per sample, shape
(B,); the loss is the batch mean. Values are computed in float32 whatever the input dtype.

* ``mse``: mean over all non-batch elements of (x - y)^2.
* ``pseudo-huber``: sqrt(mean((x - y)^2) + c^2) - c per sample, c = 0.03 by default. The mean runs over
  the flattened sample, so c is in per-element RMS units and does not depend on the image size. This is
  iCT's sqrt(||x - y||^2 + c'^2) - c' divided by sqrt(d), with c' = c * sqrt(d) (d = C*H*W). It is *not*
  the official code's unused ``Huber`` option, which applies the formula per element and then averages
  (transition at |x - y| ~ c per pixel instead of at an RMS error of c).
* ``lpips``: LPIPS v0.1 with the VGG16 trunk from the ``lpips`` package (pip ``lpips==0.1.4``; the
  optional ``kdm[metrics]`` extra), inputs in [-1, 1], no resizing (32x32 images go through VGG as they
  are, as in the official code). The official code uses piq's LPIPS, which replaces VGG's max pooling by
  average pooling; values differ from piq's.

LPIPS never downloads anything and never runs with random trunk weights: the torchvision VGG16
ImageNet weights are read from ``vgg16_weights`` (argument), else ``$KDM_VGG16_WEIGHTS``, else torch
hub's cache file ``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth``; a missing file or package raises
``DistanceUnavailable`` naming what to provide. The linear heads ship inside the ``lpips`` package.

* ``lpips-own``: LPIPS's structure (unit-normalised features of 4 layers, squared differences summed
  over channels, spatial mean; *uniform* heads, mean over layers) on a small VGG-style CIFAR network the
  pipeline trains itself (``models.perceptual.OwnLPIPS``; ``pipeline.training.perceptual`` trains and
  loads it). Needs no download: the weights are an artifact whose URI is ``train.perceptual_net``. It
  is another network (architecture, seed, weights) than the evaluation's FD/KID extractor, so that a
  student is never trained on the metric's own features; reports name it ``lpips-own:<network id>``.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import nn

DISTANCES = ("mse", "pseudo-huber", "lpips", "lpips-own")
PSEUDO_HUBER_C = 0.03
VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILE}"
VGG16_ENV = "KDM_VGG16_WEIGHTS"
LPIPS_REQUIREMENT = "lpips==0.1.4"

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class DistanceUnavailable(RuntimeError):
    """A distance cannot be built here (missing optional package or weights file); the message says how."""


def _flat_sq(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if x.shape != y.shape:
        raise ValueError(f"distance inputs differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    return (x.float() - y.float()).square().flatten(1)


def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error, shape (B,)."""
    return _flat_sq(x, y).mean(1)


def pseudo_huber(x: torch.Tensor, y: torch.Tensor, c: float = PSEUDO_HUBER_C) -> torch.Tensor:
    """Per-sample sqrt(mean((x - y)^2) + c^2) - c, shape (B,)."""
    return torch.sqrt(_flat_sq(x, y).mean(1) + c * c) - c


def hub_checkpoint_path(fname: str) -> Path:
    """torch hub's cache file ``$TORCH_HOME/hub/checkpoints/<fname>`` (where torchvision downloads weights to)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / fname


def local_weights_path(path: Optional[str | os.PathLike], env: str, default: Path) -> Path:
    """Where a weights file is looked for (nothing is downloaded): ``path``, else $<env>, else ``default``."""
    if path:
        return Path(path).expanduser()
    value = os.environ.get(env)
    if value:
        return Path(value).expanduser()
    return default


def vgg16_weights_path(path: Optional[str | os.PathLike] = None) -> Path:
    """Where the VGG16 ImageNet weights are looked for: ``path``, else $KDM_VGG16_WEIGHTS, else torch hub's cache."""
    return local_weights_path(path, VGG16_ENV, hub_checkpoint_path(VGG16_FILE))


def _import_lpips():
    try:
        import lpips  # noqa: F401  (optional dependency)
    except ImportError as e:
        raise DistanceUnavailable(
            f"distance 'lpips' needs the optional package lpips ({e}); install it with "
            f"`pip install 'kdm[metrics]'` (or `pip install {LPIPS_REQUIREMENT}` next to the pinned torch and "
            f"torchvision, so pip does not replace them), or choose distance 'pseudo-huber' or 'mse'") from None
    return lpips


class LPIPSDistance(nn.Module):
    """Frozen LPIPS (VGG16 trunk, v0.1 linear heads); forward(x, y) -> (B,) for images in [-1, 1]."""

    def __init__(self, vgg16_weights: Optional[str | os.PathLike] = None):
        super().__init__()
        weights = vgg16_weights_path(vgg16_weights)
        problems = []
        if not weights.is_file():
            problems.append(
                f"the VGG16 ImageNet weights file {weights} does not exist; download {VGG16_URL} on a machine "
                f"with internet access and place it at exactly that path (torch hub's cache: "
                f"$TORCH_HOME/hub/checkpoints/{VGG16_FILE}), or point ${VGG16_ENV} (or the vgg16_weights "
                f"setting) at a copy")
        try:
            lpips = _import_lpips()
        except DistanceUnavailable as e:
            problems.insert(0, str(e))
        if problems:
            raise DistanceUnavailable("cannot build distance 'lpips': " + "; and ".join(problems))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # torchvision's deprecation note on lpips' `pretrained=` call
            # pnet_rand=True: build the trunk without torchvision's download, then load the file below.
            net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        load_trunk_weights(net.net, state, weights)
        net.eval().requires_grad_(False)
        self.net = net
        self.weights_path = str(weights)

    def train(self, mode: bool = True) -> "LPIPSDistance":
        return super().train(False)   # always eval: dropout in the linear heads stays off

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape:
            raise ValueError(f"distance inputs differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
        return self.net(x, y).float().reshape(x.shape[0])


def lpips_trunk_convs(trunk: nn.Module) -> Iterator[tuple[str, nn.Conv2d]]:
    """The convolutions of an lpips backbone (modules ``slice{k}.{i}``), each with its index ``i``, which is
    also its index in torchvision's ``features`` (state dict keys ``features.{i}.weight`` / ``.bias``)."""
    for k in range(1, trunk.N_slices + 1):
        for name, module in getattr(trunk, f"slice{k}").named_children():
            if isinstance(module, nn.Conv2d):
                yield name, module


def load_trunk_weights(trunk: nn.Module, state: dict, source: Path, n_convs: int = 13,
                       error: type[Exception] = DistanceUnavailable) -> None:
    """Copy torchvision ``features.{i}.*`` tensors into lpips' ``slice{k}.{i}`` modules; every conv must be
    filled (13 for VGG16, 5 for AlexNet). Problems raise ``error`` naming the file."""
    filled = 0
    for name, module in lpips_trunk_convs(trunk):
        w, b = state.get(f"features.{name}.weight"), state.get(f"features.{name}.bias")
        if w is None or b is None:
            raise error(f"{source} is not the expected torchvision state dict (features.{name} missing); "
                        f"replace it with the torchvision release file (VGG16: {VGG16_URL})")
        if w.shape != module.weight.shape:
            raise error(f"{source}: features.{name}.weight has shape {tuple(w.shape)}, "
                        f"expected {tuple(module.weight.shape)}")
        with torch.no_grad():
            module.weight.copy_(w)
            module.bias.copy_(b)
        filled += 1
    if filled != n_convs:
        raise error(f"loaded {filled} convolutions from {source}, expected {n_convs}")


def make_distance(name: str, pseudo_huber_c: float = PSEUDO_HUBER_C,
                  vgg16_weights: Optional[str | os.PathLike] = None,
                  perceptual_net: Optional[nn.Module] = None) -> Distance:
    """The distance called ``name`` (one of DISTANCES) as a callable (x, y) -> (B,).

    'lpips' and 'lpips-own' return an ``nn.Module`` (move it to the training device); the others are
    plain functions. 'lpips-own' needs ``perceptual_net``: an ``OwnLPIPS`` (as
    ``pipeline.training.perceptual.load_perceptual_distance`` returns) or a bare ``PerceptualConvNet``.
    """
    if name == "mse":
        return mse
    if name == "pseudo-huber":
        if pseudo_huber_c <= 0:
            raise ValueError(f"pseudo_huber_c must be > 0, got {pseudo_huber_c}")
        c = float(pseudo_huber_c)
        return lambda x, y: pseudo_huber(x, y, c)
    if name == "lpips":
        return LPIPSDistance(vgg16_weights)
    if name == "lpips-own":
        from models.perceptual import OwnLPIPS
        if perceptual_net is None:
            raise DistanceUnavailable(
                "distance 'lpips-own' needs the pipeline's perceptual network: train it with "
                "pipeline.training.perceptual.train_perceptual_net(dataset_uri, cfg, out) (or `python -m "
                "pipeline.training.perceptual --dataset DATASET --out URI`) and set train.perceptual_net to that "
                "URI, or choose distance 'pseudo-huber'")
        return perceptual_net if isinstance(perceptual_net, OwnLPIPS) else OwnLPIPS(perceptual_net)
    raise ValueError(f"unknown distance {name!r}; valid: {', '.join(DISTANCES)}")
