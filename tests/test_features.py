import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root, when run as plain `pytest`

from pipeline.evaluation import features
from pipeline.errors import KDMError
from storage_schemas.protocol import ExtractorTrainConfig  # noqa: E402

torch.set_num_threads(1)

TINY = ExtractorTrainConfig(width=4, num_classes=2, epochs=2, batch_size=16, lr=0.05, precision="fp32")


def toy_data(n=48, size=16, seed=0):
    """Two classes: dark and bright images with noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    base = np.where(y[:, None, None, None] == 1, 170, 70)
    x = np.clip(base + rng.normal(0, 30, (n, 3, size, size)), 0, 255).astype(np.uint8)
    return x, y


def state(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_training_is_deterministic_given_the_seed():
    x, y = toy_data()
    a, _ = features.train_network(x, y, TINY, progress=False)
    b, _ = features.train_network(x, y, TINY, progress=False)
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c, _ = features.train_network(x, y, TINY.model_copy(update={"seed": 1}), progress=False)
    assert not all(torch.equal(sa[k], state(c)[k]) for k in sa)


def test_augment_is_deterministic_and_keeps_shape():
    x = torch.from_numpy(toy_data(8)[0])
    a = features.augment(x, torch.Generator().manual_seed(3), 4, True)
    b = features.augment(x, torch.Generator().manual_seed(3), 4, True)
    assert a.shape == (8, 3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b)
    # no padding, no flip: identity
    assert torch.equal(features.augment(x, torch.Generator(), 0, False), x.float())


def test_artifact_round_trip_and_feature_shape(tmp_path):
    x, y = toy_data()
    xt, yt = toy_data(20, seed=1)
    out = str(tmp_path / "fx")
    m = features.train_extractor(x, y, TINY, out, test_images=xt, test_labels=yt, dataset_id="toy", progress=False)
    assert m.id.startswith("resnet9w4-") and "fid" not in m.id.lower()
    assert m.feature_dim == 32 and m.image_shape == (3, 16, 16)
    assert m.test_images == 20 and 0.0 <= m.test_accuracy <= 1.0
    assert m.training_seed == 0 and m.dataset_id == "toy" and m.device == "cpu"
    files = sorted(p.name for p in Path(out).iterdir())
    assert files == ["config.json", "manifest.json", "weights.safetensors"]
    assert json.loads((Path(out) / "config.json").read_text())["width"] == 4

    fx = features.load_extractor(out)
    assert fx.id == m.id and fx.sha256 == m.weights_sha256 and fx.ref.feature_dim == 32
    f_u8 = fx(torch.from_numpy(xt))
    assert f_u8.shape == (20, 32) and f_u8.dtype == torch.float32
    assert torch.equal(f_u8, fx(torch.from_numpy(xt).float()))   # clean-fid passes float [0, 255]
    assert fx.logits(torch.from_numpy(xt)).shape == (20, 2)
    with pytest.raises(ValueError, match="custom_fn_resize"):
        fx(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))

    # idempotent: the same inputs find the committed artifact
    assert features.train_extractor(x, y, TINY, out, progress=False) == m


def test_corrupt_weights_are_refused(tmp_path):
    x, y = toy_data()
    out = tmp_path / "fx"
    features.train_extractor(x, y, TINY.model_copy(update={"epochs": 1}), str(out), progress=False)
    w = out / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(KDMError, match="does not match the manifest"):
        features.load_extractor(str(out))


def test_input_validation():
    x, y = toy_data()
    with pytest.raises(KDMError, match="uint8"):
        features.train_network(x.astype(np.float32), y, TINY, progress=False)
    with pytest.raises(KDMError, match="0..1"):
        features.train_network(x, y + 5, TINY, progress=False)


def test_dataset_split_adapter():
    x, y = toy_data(4)

    class A:
        def arrays(self, split):
            return x, y

    class B:
        def load(self, split):
            return {"images": x, "labels": y}

    for ds in (A(), B(), {"train": (x, y)}):
        xi, yi = features.dataset_split_arrays(ds, "train")
        assert xi.shape == x.shape and (yi == y).all()
    with pytest.raises(KDMError, match="cannot read split"):
        features.dataset_split_arrays(object(), "train")


def test_usable_as_cleanfid_custom_feature_extractor(tmp_path):
    cf = importlib.import_module("cleanfid.fid")
    x, y = toy_data()
    out = str(tmp_path / "fx")
    features.train_extractor(x, y, TINY.model_copy(update={"epochs": 1}), out, progress=False)
    fx = features.load_extractor(out)
    gen = torch.Generator().manual_seed(0)
    G = lambda z: torch.randint(0, 256, (len(z), 3, 16, 16), generator=gen).float()   # noqa: E731
    feats = cf.get_model_features(G, fx, mode="clean", z_dim=4, num_gen=10, batch_size=5, device=torch.device("cpu"),
                                  verbose=False, custom_fn_resize=lambda img: img)
    assert feats.shape == (10, 32) and np.isfinite(feats).all()
