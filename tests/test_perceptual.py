"""Distance lpips-own: the pipeline's own perceptual network, its artifact, the distance's properties, its
independence from the evaluation extractor, and a student trained with it naming it in its manifest."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.distances import DISTANCES, DistanceUnavailable, make_distance
from models.perceptual import OwnLPIPS, PerceptualConvNet
from pipeline.errors import KDMError
from pipeline.evaluation import features
from pipeline.training import perceptual as pt
from pipeline.training.image_data import write_synthetic_store
from pipeline.training.image_train import (ImageTrainer, image_run_version, read_image_student_manifest,
                                           train_image_student)
from storage_schemas.kdm_image import ImageTrainConfig, KDMImageConfig, SongUNetConfig
from storage_schemas.perceptual import PerceptualNetRef, PerceptualNetTrainConfig
from storage_schemas.protocol import ExtractorTrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = PerceptualNetTrainConfig(width=4, num_classes=2, epochs=6, batch_size=16, lr=0.2, precision="fp32")
TINY_FX = ExtractorTrainConfig(width=4, num_classes=2, epochs=1, batch_size=16, lr=0.05, precision="fp32")


def toy_data(n=96, size=16, seed=0):
    """Two classes: horizontal vs vertical stripes, random phase, colour and noise (texture matters)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    g = np.arange(size)
    x = np.empty((n, 3, size, size))
    for i in range(n):
        wave = np.sin(2 * np.pi * (g / 4.0) + rng.uniform(0, 2 * np.pi))
        img = wave[None, :] if y[i] else wave[:, None]
        x[i] = 128 + 90 * np.broadcast_to(img, (size, size))[None] * rng.uniform(0.6, 1.0, (3, 1, 1))
    x += rng.normal(0, 10, x.shape)
    return np.clip(x, 0, 255).astype(np.uint8), y


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A perceptual network artifact and an evaluation extractor artifact trained on the same toy data."""
    root = tmp_path_factory.mktemp("nets")
    x, y = toy_data()
    xt, yt = toy_data(32, seed=1)
    fxm = features.train_extractor(x, y, TINY_FX, str(root / "extractor"), dataset_id="toy", progress=False)
    m = pt.train_perceptual_net_arrays(x, y, TINY, str(root / "pnet"), test_images=xt, test_labels=yt,
                                       dataset_id="toy", extractor=fxm, progress=False)
    return {"root": root, "pnet": str(root / "pnet"), "extractor": str(root / "extractor"), "manifest": m,
            "extractor_manifest": fxm, "x": x}


def as_signed(u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(u8).float() / 127.5 - 1.0


def blur(x: torch.Tensor, passes: int) -> torch.Tensor:
    for _ in range(passes):
        x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return x


def test_artifact_and_distance_properties(trained):
    m = trained["manifest"]
    assert m.id.startswith("pnet-vgg-avgw4-") and m.layer_channels == (4, 8, 16, 32)
    assert m.training_seed == 1 and m.independent_of == trained["extractor_manifest"].ref()
    assert m.test_accuracy is not None and m.test_accuracy > 0.9          # the toy task is learnt
    d = pt.load_perceptual_distance(trained["pnet"], extractor=trained["extractor_manifest"])
    assert isinstance(d, OwnLPIPS) and d.name == f"lpips-own:{m.id}" and d.sha256 == m.weights_sha256
    assert not any(p.requires_grad for p in d.parameters()) and not d.net.training
    d.train()
    assert not d.net.training                                             # BatchNorm stays frozen
    x = as_signed(trained["x"][:8])
    y = as_signed(toy_data(8, seed=5)[0])
    # zero on identical images, symmetric, non-negative, one float32 value per sample
    assert torch.equal(d(x, x), torch.zeros(8))
    dxy, dyx = d(x, y), d(y, x)
    assert dxy.shape == (8,) and dxy.dtype == torch.float32 and (dxy > 0).all()
    assert torch.allclose(dxy, dyx, atol=1e-6)
    # larger for more distorted images: more blur, more noise
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g)
    by_blur = [d(x, blur(x, k)).mean().item() for k in (1, 2, 4)]
    by_noise = [d(x, (x + s * noise).clamp(-1, 1)).mean().item() for s in (0.05, 0.2, 0.5)]
    assert 0 < by_blur[0] < by_blur[1] < by_blur[2], by_blur
    assert 0 < by_noise[0] < by_noise[1] < by_noise[2], by_noise
    # differentiable with respect to the images (finite gradients, also where x == y), not the network
    xr = blur(x, 2).requires_grad_(True)
    d(xr, x).sum().backward()
    assert torch.isfinite(xr.grad).all() and xr.grad.abs().sum() > 0
    xs = x.clone().requires_grad_(True)
    d(xs, x).sum().backward()
    assert torch.isfinite(xs.grad).all()
    # against(): several images against one reference in one pass, the same values
    a, b = d.against(x, y, blur(x, 1))
    assert torch.allclose(a, dxy, atol=1e-6) and torch.allclose(b, d(blur(x, 1), x), atol=1e-6)
    # bf16 autocast and channels_last give the same values up to bf16 rounding
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = d(x.bfloat16().contiguous(memory_format=torch.channels_last), y)
    assert v.dtype == torch.float32 and torch.allclose(v, dxy, rtol=0.1, atol=1e-3)
    # make_distance wraps a bare network and names the option
    assert "lpips-own" in DISTANCES
    assert isinstance(make_distance("lpips-own", perceptual_net=d.net), OwnLPIPS)
    assert make_distance("lpips-own", perceptual_net=d) is d


def test_artifact_is_found_again_and_verified(trained, tmp_path):
    x, y = toy_data()
    again = pt.train_perceptual_net_arrays(x, y, TINY, trained["pnet"], progress=False)
    assert again == trained["manifest"]                                  # not retrained
    with pytest.raises(KDMError, match="already holds"):
        pt.train_perceptual_net_arrays(x, y, TINY.model_copy(update={"seed": 2}), trained["pnet"], progress=False)
    # a copy with modified weights is refused
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in Path(trained["pnet"]).iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    w = copy / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(KDMError, match="sha256"):
        pt.load_perceptual_net(str(copy))


def test_refuses_the_evaluation_extractor(trained):
    fxm = trained["extractor_manifest"]
    # the extractor's artifact is not a perceptual network
    with pytest.raises(KDMError, match="evaluation's feature extractor"):
        pt.load_perceptual_distance(trained["extractor"])
    # nor is its network
    fx = features.load_extractor(trained["extractor"])
    with pytest.raises(TypeError, match="never a training distance"):
        OwnLPIPS(fx.net)
    with pytest.raises(TypeError, match="never a training distance"):
        make_distance("lpips-own", perceptual_net=fx.net)
    # a network with the extractor's id or weights is refused
    same = PerceptualNetRef(id=fxm.id, sha256="0" * 64)
    with pytest.raises(KDMError, match="metric's own features"):
        pt.check_independent(same, fxm)
    with pytest.raises(KDMError, match="metric's own features"):
        pt.check_independent(PerceptualNetRef(id="pnet-x", sha256=fxm.weights_sha256), fx)
    # the same training seed is refused before training
    x, y = toy_data()
    with pytest.raises(KDMError, match="seed 0"):
        pt.train_perceptual_net_arrays(x, y, TINY.model_copy(update={"seed": 0}), str(trained["root"] / "s0"),
                                       extractor=fxm, progress=False)
    seed0 = trained["manifest"].model_copy(update={"training_seed": 0})
    with pytest.raises(KDMError, match="another seed"):
        pt.check_independent(seed0, fxm)
    pt.check_independent(trained["manifest"], fxm)                     # the real pair passes


def test_missing_network_says_what_to_do(tmp_path):
    with pytest.raises(DistanceUnavailable, match="train.perceptual_net"):
        make_distance("lpips-own")
    with pytest.raises(KDMError, match="train.perceptual_net"):
        pt.load_perceptual_distance(None)
    with pytest.raises(KDMError, match="train_perceptual_net"):
        pt.load_perceptual_distance(str(tmp_path / "nowhere"))
    cfg = KDMImageConfig(img_resolution=16, unet=SongUNetConfig(model_channels=8, channel_mult=(1, 2), num_blocks=1,
                                                                attn_resolutions=(8,)),
                         distance="lpips-own", adv_weight=0.0)
    with pytest.raises(KDMError, match="train.perceptual_net"):
        ImageTrainer(cfg, ImageTrainConfig(device="cpu", precision="fp32", batch_size=2), torch.device("cpu"))


def test_student_trains_with_it_and_names_it(trained, tmp_path):
    pairs = write_synthetic_store(str(tmp_path / "pairs"), 8, (3, 16, 16), chunk_size=8, seed=1).url
    mc = KDMImageConfig(img_resolution=16, unet=SongUNetConfig(model_channels=8, channel_mult=(1, 2), num_blocks=1,
                                                               attn_resolutions=(8,), dropout=0.0),
                        distance="lpips-own", adv_weight=0.0)
    tc = ImageTrainConfig(device="cpu", precision="fp32", batch_size=4, steps=2, threads=1, log_every=1,
                          checkpoint_every=2, perceptual_net=trained["pnet"])
    v = train_image_student(pairs, mc, tc, str(tmp_path / "run"), progress=False)
    sm = read_image_student_manifest(str(tmp_path / "run"))
    m = trained["manifest"]
    assert sm.version == v and sm.distance_net == m.ref() and sm.distance_name == f"lpips-own:{m.id}"
    assert all(np.isfinite(val) for val in sm.final_losses.values()) and sm.final_losses["rec"] > 0
    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(logs) == 2 and logs[-1]["nonfinite_steps"] == 0
    # the run version pins the network by id + sha256, not by where it is stored
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in Path(trained["pnet"]).iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    from pipeline.storage.pairstore import PairStore
    pv = PairStore.open(pairs).version
    assert image_run_version(pv, mc, tc.model_copy(update={"perceptual_net": str(moved)})) == v
    assert image_run_version(pv, mc.model_copy(update={"distance": "pseudo-huber"}), tc) != v


def test_evaluation_notes_name_the_distance_and_refuse_the_extractor(trained):
    from pipeline.evaluation import image_metrics as im
    from storage_schemas.kdm_image import distance_label

    class Student:                                    # the fields of an ImageStudentManifest the check reads
        version = "kdm-img-test"
        model = KDMImageConfig(distance="lpips-own")
        distance_net = trained["manifest"].ref()
        distance_name = None

    fxm = trained["extractor_manifest"]
    notes = im.training_distance_notes(Student, fxm)
    assert notes == {"training_distance": f"lpips-own:{trained['manifest'].id}",
                     "training_distance_net": trained["manifest"].ref().model_dump(mode="json")}
    Student.distance_net = PerceptualNetRef(id=fxm.id, sha256=fxm.weights_sha256)
    with pytest.raises(KDMError, match="metric's own features"):
        im.training_distance_notes(Student, fxm)
    Student.distance_net = None
    with pytest.raises(KDMError, match="does not name the network"):
        im.training_distance_notes(Student, fxm)
    Student.model = KDMImageConfig(distance="pseudo-huber", pseudo_huber_c=0.03)
    assert im.training_distance_notes(Student, fxm) == {"training_distance": "pseudo-huber(c=0.03)"}
    assert distance_label(KDMImageConfig(distance="lpips")) == "lpips-vgg16"


def test_stage_trains_once_on_a_prepared_dataset(tmp_path, trained):
    from image_fixtures import image_folder, write_archive
    from pipeline.data.datasets import prepare_image_dataset
    from storage_schemas.perceptual import PerceptualStageConfig
    members, _ = image_folder(np.random.default_rng(0), classes=("a", "b"), per_class={"train": 8, "test": 2},
                              size=8)
    ds = str(tmp_path / "ds")
    prepare_image_dataset(str(write_archive(tmp_path / "a.tar.gz", members)), ds, chunk_size=8, progress=False)
    from pipeline import stages
    from pipeline.recipes.cifar10 import PerceptualNet
    from storage_schemas.distill_image import DistillImageConfig
    pcfg = PerceptualStageConfig(train=TINY.model_copy(update={"epochs": 1, "batch_size": 8}), device="cpu")
    cfg = DistillImageConfig.model_validate({"preset": "smoke", "root": str(tmp_path / "root"),
                                             "perceptual": pcfg.model_dump(mode="json")})
    ins = {"dataset": ds, "extractor": trained["extractor"]}
    quiet = stages.StageContext(progress_bars=False)
    r = stages.run_stage(PerceptualNet(), cfg, ins, quiet)
    assert not r["skipped"] and r["uri"].endswith(r["version"]) and "perceptual-nets" in r["uri"]
    assert r["train_images"] == 16 and r["id"].startswith("pnet-")
    again = stages.run_stage(PerceptualNet(), cfg, ins, quiet)
    assert again["skipped"] and again["id"] == r["id"]
    assert pt.load_perceptual_distance(r["uri"]).net_id == r["id"]
    with pytest.raises(KDMError, match="another seed|seed 0"):   # checked against the extractor
        bad = pcfg.model_copy(update={"train": TINY.model_copy(update={"seed": 0, "epochs": 1, "batch_size": 8})})
        stages.run_stage(PerceptualNet(), cfg.model_copy(update={"perceptual": bad}), ins, quiet)
