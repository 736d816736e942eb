"""The `checkerboard-import` student: its preset's settings, the Fourier-feature encoders and the cosine
learning-rate schedule of the 2-D training loop (CPU-sized)."""
import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from models.kdm2d import KDM2D
from models.mlp2d import fourier_features
from pipeline import presets
from storage_schemas import KDM2DConfig, StudentRunConfig
from storage_schemas.student import TrainConfig


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# --- Fourier features --------------------------------------------------------------------------------

def test_fourier_features_values_and_order():
    x = torch.tensor([[0.5, -1.0]])
    f = fourier_features(x, 2, 0.5)
    # [x1, x2, sin(.5 x1), sin(1 x1), sin(.5 x2), sin(1 x2), cos(...) in the same order]
    angles = torch.tensor([0.25, 0.5, -0.5, -1.0])
    assert f.shape == (1, 2 + 2 * 4)
    assert torch.allclose(f[0, :2], x[0])
    assert torch.allclose(f[0, 2:6], torch.sin(angles))
    assert torch.allclose(f[0, 6:], torch.cos(angles))
    assert fourier_features(x, 0, 1.0) is x


def test_fourier_encoders_widen_only_their_first_layer():
    plain = KDM2D(hidden=16, latent_dim=8, encoder_layers=3, decoder_layers=2)
    four = KDM2D(hidden=16, latent_dim=8, encoder_layers=3, decoder_layers=2, fourier_features=3, fourier_scale=0.5)
    for enc in (four.x0_encoder, four.xT_encoder):
        assert enc.main[0].in_features == 2 * (1 + 2 * 3) + 1          # x, sin and cos of 3 frequencies, time
    assert plain.x0_encoder.main[0].in_features == 3
    extra = sum(p.numel() for p in four.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == 2 * 12 * 16                                          # 12 more inputs of two encoders
    assert sorted(four.state_dict()) == sorted(plain.state_dict())     # no buffers: frequencies are fixed


def test_fourier_model_shapes_and_deterministic_sampling():
    cfg = KDM2DConfig(hidden=16, latent_dim=8, encoder_layers=2, decoder_layers=2, fourier_features=4,
                      fourier_scale=0.5)
    torch.manual_seed(0)
    a = KDM2D.from_config(cfg)
    torch.manual_seed(0)
    b = KDM2D.from_config(cfg)
    x0, xT = torch.randn(9, 2), torch.randn(9, 2)
    out = a(x0, xT, generator=torch.Generator().manual_seed(1))
    assert out.z0.shape == out.z_push.shape == (9, 8) and out.x0_rec.shape == out.x0_push.shape == (9, 2)
    with torch.no_grad():
        assert a.generate(xT).shape == (9, 2)
        assert torch.equal(a.generate(xT), a.generate(xT))
        assert torch.equal(a.generate(xT), b.generate(xT))               # same seed, same weights, same map
        assert torch.equal(a.generate(xT[:4]), a.generate(xT)[:4])       # a sample does not depend on its batch


def test_fourier_config_validation():
    with pytest.raises(ValidationError):
        KDM2DConfig(fourier_features=-1)
    with pytest.raises(ValidationError):
        KDM2DConfig(fourier_features=2, fourier_scale=0.0)
    with pytest.raises(ValidationError, match="fourier_features is 0"):
        KDM2DConfig(fourier_scale=0.5)
    default = KDM2DConfig()
    assert (default.fourier_features, default.fourier_scale) == (0, 1.0)   # official model: no features


# --- cosine learning rate -----------------------------------------------------------------------------

def test_cosine_schedule_values():
    tc = TrainConfig(lr=1e-3, lr_schedule="cosine", lr_min=1e-5, steps=100)
    assert tc.lr_at(0) == pytest.approx(1e-3)
    assert tc.lr_at(50) == pytest.approx((1e-3 + 1e-5) / 2)
    assert tc.lr_at(100) == pytest.approx(1e-5)
    lrs = [tc.lr_at(s) for s in range(101)]
    assert all(x >= y for x, y in zip(lrs, lrs[1:]))                  # never increases
    const = TrainConfig(lr=2e-3, steps=100)
    assert const.lr_schedule == "constant" and {const.lr_at(s) for s in (0, 50, 99)} == {2e-3}


def test_schedule_validation():
    with pytest.raises(ValidationError, match="constant schedule"):
        TrainConfig(lr_min=1e-5)
    with pytest.raises(ValidationError, match="exceeds lr"):
        TrainConfig(lr=1e-4, lr_schedule="cosine", lr_min=1e-3)
    with pytest.raises(ValidationError):
        TrainConfig(lr_schedule="linear")


@pytest.fixture(scope="module")
def tiny_pairs(tmp_path_factory):
    from board_fixtures import tiny_board_store
    return tiny_board_store(tmp_path_factory.mktemp("pairs"))


def test_training_follows_the_cosine_schedule_and_resumes_to_the_same_weights(tiny_pairs, tmp_path):
    from safetensors.torch import load_file
    from pipeline.training import train2d
    sets = ["train.steps=40", "train.checkpoint_every=10", "train.log_every=10", "train.threads=1",
            "train.lr_schedule=cosine", "train.lr_min=0.0001", "train.batch_size=32",
            "model.fourier_features=2", "model.fourier_scale=0.5"]
    cfg = presets.load("student", "smoke", sets=sets)
    full = tmp_path / "full"
    train2d.train_student(tiny_pairs, cfg, str(full), progress=False)
    import json
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    assert [r["lr"] for r in rows] == pytest.approx([cfg.train.lr_at(s - 1) for s in (10, 20, 30, 40)])
    assert rows[-1]["lr"] < rows[0]["lr"]
    part = tmp_path / "part"
    train2d.train_student(tiny_pairs, cfg, str(part), progress=False, stop_after=20)
    train2d.train_student(tiny_pairs, cfg, str(part), progress=False)
    wa, wb = load_file(str(full / "student.safetensors")), load_file(str(part / "student.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert train2d.read_student_manifest(str(full)).model.fourier_features == 2


def test_official_preset_keeps_the_official_settings():
    cfg = presets.load("student", "checkerboard-official")
    assert cfg.model.fourier_features == 0 and cfg.train.lr_schedule == "constant"
    assert (cfg.model.hidden, cfg.model.latent_dim, cfg.model.latent_noise) == (256, 256, 0.4)
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.steps) == (3e-4, 4096, 20000)


def test_checkerboard_import_uses_the_chosen_student_settings():
    cfg = presets.load("distill", "checkerboard-import")
    assert cfg.source == "import"
    s = cfg.student
    assert s == presets.load("student", "checkerboard-import") and s.preset == "checkerboard-import"
    m, t = s.model, s.train
    assert (m.hidden, m.latent_dim, m.encoder_layers, m.decoder_layers, m.operator) == (256, 256, 5, 5, "linear")
    assert (m.latent_noise, m.use_pred_loss, m.fourier_features, m.fourier_scale) == (0.2, False, 4, 0.5)
    assert (t.lr, t.lr_schedule, t.lr_min, t.batch_size, t.steps, t.ema_decay) == (3e-3, "cosine", 0.0, 512, 24000,
                                                                                 0.999)
    assert t.lr_at(0) == 3e-3 and t.lr_at(24000) == 0.0


def test_demo_student_preset_is_unchanged():
    """`make demo` keeps the fast `checkerboard` student (constant lr, no Fourier features)."""
    s = presets.load("distill", "checkerboard").student
    assert s.preset == "checkerboard"
    assert (s.model.hidden, s.model.latent_dim, s.model.latent_noise, s.model.fourier_features) == (128, 64, 0.4, 0)
    assert (s.train.lr, s.train.lr_schedule, s.train.batch_size, s.train.steps) == (3e-3, "constant", 512, 12000)
