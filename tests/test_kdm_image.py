"""Image KDM: official parameter counts, forward/generate shapes, conditioning, discriminator, configs."""
from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from torch.nn import functional as F

from models.discriminator import Discriminator, adversarial_losses, discriminator_loss, generator_adversarial_loss
from models.kdm2d import KDMForward
from models.kdm_image import KDMImage
from models.koopman import FactorizedKoopman, LinearKoopman
from models.losses import kdm_losses
from pipeline.cli.model_info import format_model_info, model_info
from storage_schemas.kdm_image import (IMAGE_PRESETS, ImageTrainConfig, KDMImageConfig, SongUNetConfig,
                                       image_preset)

TINY_UNET = dict(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), dropout=0.1)

EXPECTED = {
    "cifar10-uncond": (47_476_165, {"x0_encoder": 15_475_521, "xT_encoder": 15_475_521, "decoder": 15_475_523,
                                    "koopman": 1_049_600}),
    "cifar10-uncond-f": (50_622_917, {"x0_encoder": 15_475_521, "xT_encoder": 15_475_521, "decoder": 15_475_523,
                                      "koopman": 4_196_352}),
    "cifar10-cond": (47_489_541, {"x0_encoder": 15_476_225, "xT_encoder": 15_476_225, "decoder": 15_476_227,
                                  "koopman": 1_049_600, "control": 11_264}),
    "ffhq64": (18_203_365, {"x0_encoder": 3_881_377 + 2_097_664, "xT_encoder": 3_881_377 + 2_097_664,
                            "decoder": 3_881_379 + 2_101_248, "koopman": 262_656}),
    "afhq64": (18_203_365, {"x0_encoder": 5_979_041, "xT_encoder": 5_979_041, "decoder": 5_982_627,
                            "koopman": 262_656}),
}


def tiny(**kw) -> KDMImage:
    torch.manual_seed(0)
    args = dict(img_resolution=16, channels=3, unet=TINY_UNET)
    args.update(kw)
    return KDMImage(**args)


# -- official parameter counts -------------------------------------------------------------------

@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_official_preset_parameter_counts(preset):
    info = model_info(preset)
    total, modules = EXPECTED[preset]
    assert info["preset"] == preset
    assert info["trainable_parameters"] == total
    assert info["modules"] == modules
    assert sum(info["modules"].values()) == total
    assert info["discriminator_parameters"] == 663_745


def test_sampling_parameter_counts():
    assert model_info("cifar10-uncond")["sampling_parameters"] == 32_000_644
    assert model_info("cifar10-cond")["sampling_parameters"] == 32_013_316
    assert model_info("cifar10-uncond-f")["sampling_parameters"] == 35_147_396
    assert model_info("ffhq64")["sampling_parameters"] == 12_224_324


def test_preset_settings():
    assert set(IMAGE_PRESETS) == {"cifar10-uncond", "cifar10-uncond-f", "cifar10-cond", "ffhq64", "afhq64"}
    for name, cfg in IMAGE_PRESETS.items():
        u = cfg.unet
        assert (u.channel_mult, u.num_blocks, u.attn_resolutions, u.dropout) == ((1, 2, 2, 2), 4, (16,), 0.10)
        assert (u.embedding_type, u.encoder_type, u.decoder_type, u.resample_filter) == (
            "positional", "standard", "standard", (1, 1))
        assert (cfg.latent_channels, cfg.latent_noise, cfg.noise_scale, cfg.adv_weight) == (1, 0.4, 80.0, 0.01)
        assert cfg.latent_dim == (1024 if name.startswith("cifar") else 512)
    assert IMAGE_PRESETS["ffhq64"].unet.model_channels == 32 and IMAGE_PRESETS["ffhq64"].latent_proj_dim == 512
    assert IMAGE_PRESETS["cifar10-uncond-f"].operator == "factorized"
    assert IMAGE_PRESETS["cifar10-cond"].label_dim == 10


def test_model_info_format_and_errors():
    text = format_model_info(model_info("cifar10-cond"))
    lines = text.splitlines()
    assert "trainable_parameters: 47489541" in lines
    for name, count in EXPECTED["cifar10-cond"][1].items():
        assert f"  {name}: {count}" in lines
    with pytest.raises(ValueError) as err:
        model_info("cifar100")
    for name in IMAGE_PRESETS:
        assert name in str(err.value)
    with pytest.raises(ValueError):
        image_preset("nope")


def test_factorized_operator_count_is_4d2_plus_2d():
    with torch.device("meta"):
        op = FactorizedKoopman(64)
    assert sum(p.numel() for p in op.parameters()) == 4 * 64 ** 2 + 2 * 64


# -- forward / generate on a tiny model ---------------------------------------------------------

def test_forward_and_generate_shapes():
    model = tiny()
    x0, xT = torch.randn(2, 3, 16, 16), 80 * torch.randn(2, 3, 16, 16)
    out = model(x0, xT)
    assert isinstance(out, KDMForward)
    for name in ("z0", "zT", "z0_noisy", "zT_noisy", "z_push"):
        assert getattr(out, name).shape == (2, 256), name
    assert out.x0_rec.shape == out.x0_push.shape == (2, 3, 16, 16)
    assert isinstance(model.koopman, LinearKoopman) and model.latent_dim == 256
    losses = kdm_losses(x0, out)
    losses["total"].backward()
    assert all(p.grad is not None for p in model.koopman.parameters())
    assert model(x0, xT, decode_push=False).x0_push is None
    model.eval()
    with torch.no_grad():
        g1, g2 = model.generate(xT), model.generate(xT)
    assert g1.shape == (2, 3, 16, 16) and torch.equal(g1, g2)  # sampling adds no noise


def test_latent_projection_and_factorized_operator():
    model = tiny(latent_proj_dim=32, operator="factorized")
    assert model.x0_encoder.proj.weight.shape == (32, 256)
    assert model.decoder.proj.weight.shape == (256, 32)
    assert torch.all(model.x0_encoder.proj.bias == 0)
    assert isinstance(model.koopman, FactorizedKoopman) and model.koopman.dim == 32
    out = model(torch.randn(3, 3, 16, 16), 80 * torch.randn(3, 3, 16, 16))
    assert out.z0.shape == out.z_push.shape == (3, 32)
    assert out.x0_push.shape == (3, 3, 16, 16)
    assert torch.isfinite(model.spectral_loss("unit-disk-uniform"))


def test_latent_noise_and_push():
    model = tiny(latent_noise=0.4)
    x0, xT = torch.randn(8, 3, 16, 16), 80 * torch.randn(8, 3, 16, 16)
    out = model(x0, xT, generator=torch.Generator().manual_seed(1))
    assert (out.z0_noisy - out.z0).std().item() == pytest.approx(0.4, rel=0.05)
    assert (out.zT_noisy - out.zT).std().item() == pytest.approx(0.4, rel=0.05)
    assert torch.allclose(out.z_push, model.koopman(out.zT_noisy))  # push of the *noisy* z_T
    quiet = tiny(latent_noise=0.0)
    out = quiet(x0, xT)
    assert torch.equal(out.z0, out.z0_noisy) and torch.equal(out.zT, out.zT_noisy)


def _nontrivial(model: KDMImage) -> KDMImage:
    """Perturbed decoder weights (its output convolution starts near zero), so decoded images are O(1)."""
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("kw", [dict(), dict(label_dim=3, latent_proj_dim=16, operator="factorized")])
def test_fused_decoder_call_matches_two_calls(kw):
    """One decoder call on [z0_noisy; z_push] (the default) is the official two calls up to float rounding
    (the batch size may change the order of sums in the convolutions); the latents are bitwise equal.
    Dropout is off here: with it, the fused call draws its masks in another order."""
    model = _nontrivial(tiny(unet={**TINY_UNET, "dropout": 0.0}, **kw))
    x0, xT = torch.randn(3, 3, 16, 16), 80 * torch.randn(3, 3, 16, 16)
    labels = torch.tensor([0, 1, 2]) if kw else None
    outs = []
    for fuse in (True, False):
        torch.manual_seed(5)                      # the same dropout masks
        outs.append(model(x0, xT, labels, generator=torch.Generator().manual_seed(1), fuse_decoder=fuse))
    fused, split = outs
    for name in ("z0", "zT", "z0_noisy", "zT_noisy", "z_push"):
        assert torch.equal(getattr(fused, name), getattr(split, name)), name
    assert fused.x0_rec.abs().mean() > 0.1
    for name in ("x0_rec", "x0_push"):
        a, b = getattr(fused, name), getattr(split, name)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (name, (a - b).abs().max().item())   # ~1e-6 seen


def test_forward_takes_external_noise_and_the_spectral_kind():
    """The engine's arguments: eps0/epsT from its own stream (the same result as drawing them from a
    generator), the KDM-F spectral penalty, and a tuple output (what DistributedDataParallel scans)."""
    model = tiny(label_dim=3, latent_proj_dim=16, operator="factorized")
    x0, xT, labels = torch.randn(2, 3, 16, 16), 80 * torch.randn(2, 3, 16, 16), torch.tensor([0, 2])
    g = torch.Generator().manual_seed(3)
    eps0, epsT = torch.randn(2, 16, generator=g), torch.randn(2, 16, generator=g)
    torch.manual_seed(7)
    drawn = model(x0, xT, labels, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(7)
    given = model(x0, xT, F.one_hot(labels, 3).float(), eps0=eps0, epsT=epsT, spectral="unit-disk-uniform")
    assert isinstance(given, tuple) and drawn.spectral is None
    for name in ("z0", "z0_noisy", "zT_noisy", "z_push", "x0_rec", "x0_push"):
        assert torch.equal(getattr(drawn, name), getattr(given, name)), name
    assert torch.equal(given.z0_noisy, given.z0 + 0.4 * eps0)
    assert torch.equal(given.spectral, model.koopman.spectral_loss("unit-disk-uniform"))
    assert set(kdm_losses(x0, given)) == {"rec", "lat", "pred", "spectral", "total"}


def test_forward_under_bf16_autocast_keeps_noisy_latents_and_spectral_in_fp32():
    model = tiny(operator="factorized")
    x0, xT = torch.randn(2, 3, 16, 16), 80 * torch.randn(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x0, xT, spectral="inverse")
    assert out.z0.dtype == torch.bfloat16
    assert out.z0_noisy.dtype == out.zT_noisy.dtype == out.spectral.dtype == torch.float32
    assert out.x0_rec.shape == out.x0_push.shape == (2, 3, 16, 16)


def test_noise_scale_convention():
    model = tiny()
    xT = model.sample_noise(64, generator=torch.Generator().manual_seed(0))
    assert xT.shape == (64, 3, 16, 16)
    assert xT.std().item() == pytest.approx(80.0, rel=0.02)


# -- conditioning ---------------------------------------------------------------------------------

def test_control_term_is_sized_from_latent_and_changes_output():
    model = tiny(label_dim=5, latent_proj_dim=24).eval()
    assert model.control.in_features == 5 and model.control.out_features == 24
    for unet in (model.x0_encoder.unet, model.xT_encoder.unet, model.decoder.unet):
        assert unet.map_label is not None and unet.map_label.in_features == 5
    z = torch.randn(2, 24)
    y0, y1 = torch.eye(5)[[0, 0]], torch.eye(5)[[3, 3]]
    diff = model.push(z, y1) - model.push(z, y0)
    assert torch.allclose(diff, (model.control.weight[:, 3] - model.control.weight[:, 0]).expand(2, -1), atol=1e-6)
    xT = 80 * torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a, b = model.generate(xT, torch.tensor([0, 0])), model.generate(xT, torch.tensor([3, 3]))
        a_onehot = model.generate(xT, y0)
    assert not torch.allclose(a, b)
    assert torch.allclose(a, a_onehot)  # class ids and one-hot rows are equivalent


def test_control_term_alone_changes_generated_images():
    """With the UNets' label inputs zeroed, only C_mu(y) distinguishes classes."""
    model = tiny(label_dim=3).eval()
    with torch.no_grad():
        for p in model.decoder.parameters():  # make the decoder non-trivial (output conv starts at ~1e-5)
            p.add_(0.05 * torch.randn_like(p))
        for unet in (model.x0_encoder.unet, model.xT_encoder.unet, model.decoder.unet):
            unet.map_label.weight.zero_()
            unet.map_label.bias.zero_()
    xT = 80 * torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a, b = model.generate(xT, torch.tensor([0, 0])), model.generate(xT, torch.tensor([2, 2]))
        model.control.weight.zero_()
        model.control.bias.zero_()
        c, d = model.generate(xT, torch.tensor([0, 0])), model.generate(xT, torch.tensor([2, 2]))
    assert (a - b).abs().max() > 1e-4
    assert torch.allclose(c, d)


def test_label_handling():
    cond = tiny(label_dim=4)
    with pytest.raises(ValueError):
        cond.prepare_labels(torch.tensor([0, 7]), 2, torch.zeros(1))
    with pytest.raises(ValueError):
        cond.prepare_labels(torch.zeros(2, 3), 2, torch.zeros(1))
    assert torch.equal(cond.prepare_labels(None, 2, torch.zeros(1)), torch.zeros(2, 4))
    uncond = tiny()
    assert uncond.control is None and uncond.x0_encoder.unet.map_label is None
    assert uncond.prepare_labels(torch.tensor([1, 2]), 2, torch.zeros(1)) is None  # ignored, as officially
    no_control = tiny(label_dim=4, control=False)
    assert no_control.control is None and no_control.decoder.unet.map_label is not None


# -- discriminator --------------------------------------------------------------------------------

def test_discriminator_count_and_shapes():
    disc = Discriminator()
    assert sum(p.numel() for p in disc.parameters()) == 663_745
    assert sum(isinstance(m, torch.nn.Conv2d) for m in disc.modules()) == 4
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in disc.modules()) == 2
    assert disc(torch.randn(2, 3, 32, 32)).shape == (2, 1)
    assert disc(torch.randn(2, 3, 64, 64)).shape == (2, 25)


def test_adversarial_losses():
    zeros = torch.zeros(4, 1)
    losses = adversarial_losses(zeros, zeros)
    assert losses["discriminator"].item() == pytest.approx(2 * math.log(2))
    assert losses["generator"].item() == pytest.approx(math.log(2))
    real, fake = torch.full((4, 1), 10.0), torch.full((4, 1), -10.0)
    assert discriminator_loss(real, fake).item() < 1e-3          # D is right: small loss
    assert generator_adversarial_loss(fake).item() > 9.0          # non-saturating: large for a fooled G
    fake = torch.zeros(3, 1, requires_grad=True)
    generator_adversarial_loss(fake).backward()
    assert torch.all(fake.grad < 0)                               # pushes fake logits up


# -- configs --------------------------------------------------------------------------------------

def test_config_validation_and_from_config():
    with pytest.raises(ValidationError):
        KDMImageConfig(spectral_loss="inverse")                   # needs the factorized operator
    with pytest.raises(ValidationError):
        KDMImageConfig(img_resolution=30)                         # not divisible by 2^3
    with pytest.raises(ValidationError):
        KDMImageConfig(unknown=1)
    cfg = KDMImageConfig(img_resolution=16, unet=SongUNetConfig(**TINY_UNET), label_dim=3, latent_proj_dim=16,
                         operator="factorized", spectral_loss="inverse")
    assert KDMImageConfig.model_validate_json(cfg.model_dump_json()) == cfg
    model = KDMImage.from_config(cfg)
    assert model.latent_dim == cfg.latent_dim == 16
    assert model.control.out_features == 16 and model.x0_encoder.unet.enc["16x16_conv"].out_channels == 8
    train = ImageTrainConfig()
    assert (train.lr, train.batch_size, train.ema_decay, train.steps) == (3e-4, 128, 0.9999, 800_000)
    assert (train.disc_lr, train.betas, train.grad_clip) == (3e-4, (0.9, 0.999), None)
