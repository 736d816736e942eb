"""Image distances: exact values of mse / pseudo-huber, and LPIPS' errors when its package or weights are missing."""
from __future__ import annotations

import math
import sys

import pytest
import torch

from models.distances import (DISTANCES, VGG16_ENV, VGG16_FILE, DistanceUnavailable, LPIPSDistance, make_distance,
                              mse, pseudo_huber, vgg16_weights_path)



pytestmark = pytest.mark.usefixtures("one_thread")


def test_mse_and_pseudo_huber_exact_values():
    x = torch.zeros(2, 3, 4, 4)
    y = torch.stack([torch.full((3, 4, 4), 0.04), torch.zeros(3, 4, 4)])
    assert torch.allclose(mse(x, y), torch.tensor([0.0016, 0.0]))
    # sqrt(0.0016 + 0.03^2) - 0.03 = 0.05 - 0.03 = 0.02; identical images give 0
    assert torch.allclose(pseudo_huber(x, y), torch.tensor([0.02, 0.0]), atol=1e-7)
    # per sample over the flattened image: half the pixels off by 0.08 -> mean square 0.0032
    z = torch.zeros(1, 2, 2, 2)
    z[0, 0] = 0.08
    assert math.isclose(float(pseudo_huber(torch.zeros_like(z), z, c=0.03)), math.sqrt(0.0032 + 0.0009) - 0.03,
                        rel_tol=1e-6)
    assert math.isclose(float(pseudo_huber(torch.zeros_like(z), z, c=1.0)), math.sqrt(1.0032) - 1.0, rel_tol=1e-4)
    # make_distance: per-sample values, configurable c, bf16 inputs computed in float32
    d = make_distance("pseudo-huber", pseudo_huber_c=0.03)
    assert torch.allclose(d(x.bfloat16(), y.bfloat16()), torch.tensor([0.02, 0.0]), atol=1e-4)
    assert d(x, y).dtype == torch.float32 and d(x, y).shape == (2,)
    assert make_distance("mse") is mse
    with pytest.raises(ValueError, match="unknown distance"):
        make_distance("l1")
    with pytest.raises(ValueError, match="shape"):
        mse(x, y[:1])
    assert set(DISTANCES) == {"mse", "pseudo-huber", "lpips", "lpips-own"}


def test_distances_are_differentiable():
    x = torch.zeros(2, 3, 4, 4, requires_grad=True)
    y = torch.full((2, 3, 4, 4), 0.5)
    pseudo_huber(x, y).mean().backward()
    assert torch.isfinite(x.grad).all() and (x.grad < 0).all()


def test_lpips_missing_weights_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv(VGG16_ENV, raising=False)
    expected = tmp_path / "hub" / "checkpoints" / VGG16_FILE
    assert vgg16_weights_path() == expected
    with pytest.raises(DistanceUnavailable) as e:
        make_distance("lpips")
    assert str(expected) in str(e.value)
    assert "download" in str(e.value) and VGG16_ENV in str(e.value)
    # an explicit path wins over the environment and is named when missing
    explicit = tmp_path / "elsewhere" / "vgg.pth"
    monkeypatch.setenv(VGG16_ENV, str(tmp_path / "env.pth"))
    assert vgg16_weights_path() == tmp_path / "env.pth"
    with pytest.raises(DistanceUnavailable, match=str(explicit)):
        LPIPSDistance(explicit)


def test_lpips_missing_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)     # `import lpips` raises ImportError, installed or not
    weights = tmp_path / VGG16_FILE
    weights.write_bytes(b"")            # the file exists: only the package is missing
    with pytest.raises(DistanceUnavailable) as e:
        make_distance("lpips", vgg16_weights=weights)
    msg = str(e.value)
    assert "pip install 'kdm[metrics]'" in msg and "lpips==0.1.4" in msg


def test_lpips_loads_a_weights_file(tmp_path):
    import torchvision
    torch.manual_seed(0)
    path = tmp_path / VGG16_FILE
    torch.save(torchvision.models.vgg16().state_dict(), path)   # stand-in weights, same layout
    d = make_distance("lpips", vgg16_weights=path)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    v = d(x, x.flip(0))
    assert v.shape == (2,) and (v > 0).all() and torch.allclose(d(x, x), torch.zeros(2), atol=1e-6)
    assert not any(p.requires_grad for p in d.parameters())
    conv0 = d.net.net.slice1[0].weight
    assert torch.equal(conv0, torch.load(path)["features.0.weight"])
