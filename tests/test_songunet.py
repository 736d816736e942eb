"""EDM SongUNet: parameter counts, state_dict layout, initialisation, forward semantics."""
from __future__ import annotations

import math

import pytest
import torch

from models.songunet import (use_box_resampling, use_float32_bias, use_fused_attention, INIT_MODES, AttentionOp, Conv2d, GroupNorm, PositionalEmbedding, SongUNet, UNetBlock,
                             count_parameters, weight_init)

# EDM's CIFAR-10 DDPM++ (train.py --arch=ddpmpp, dropout 0.13).
EDM_CIFAR = dict(img_resolution=32, in_channels=3, out_channels=3, label_dim=0, model_channels=128,
                 channel_mult=[2, 2, 2], channel_mult_noise=1, encoder_type="standard", decoder_type="standard",
                 resample_filter=[1, 1], embedding_type="positional", attn_resolutions=[16], dropout=0.13,
                 num_blocks=4)
TINY = dict(img_resolution=16, in_channels=3, out_channels=3, model_channels=8, channel_mult=[1, 2],
            num_blocks=1, attn_resolutions=[8])


def meta_unet(**kw) -> SongUNet:
    with torch.device("meta"):
        return SongUNet(**kw)


@pytest.fixture(scope="module")
def edm_cifar_aug() -> SongUNet:
    return meta_unet(**EDM_CIFAR, augment_dim=9)


def test_edm_cifar_ddpmpp_parameter_counts(edm_cifar_aug):
    assert count_parameters(meta_unet(**EDM_CIFAR, augment_dim=0)) == 55_732_739
    assert count_parameters(edm_cifar_aug) == 55_733_891
    # FFHQ/AFHQv2 64x64 DDPM++ (cres 1,2,2,2), for reference.
    ffhq = dict(EDM_CIFAR, img_resolution=64, channel_mult=[1, 2, 2, 2], augment_dim=9)
    assert count_parameters(meta_unet(**ffhq)) == 61_805_571


@pytest.mark.parametrize("res,mc,cin,cout,label_dim,expected", [
    (32, 64, 3, 1, 0, 15_475_521),   # CIFAR encoders
    (32, 64, 1, 3, 0, 15_475_523),   # CIFAR decoder
    (32, 64, 3, 1, 10, 15_476_225),  # conditional CIFAR encoders
    (64, 32, 3, 1, 0, 3_881_377),    # FFHQ/AFHQ encoder UNet (without projection)
    (64, 32, 1, 3, 0, 3_881_379),    # FFHQ/AFHQ decoder UNet
])
def test_kdm_unet_parameter_counts(res, mc, cin, cout, label_dim, expected):
    net = meta_unet(img_resolution=res, in_channels=cin, out_channels=cout, label_dim=label_dim,
                    model_channels=mc, channel_mult=[1, 2, 2, 2])
    assert count_parameters(net) == expected


def test_state_dict_layout_matches_edm(edm_cifar_aug):
    keys = list(edm_cifar_aug.state_dict())
    assert len(keys) == 425
    assert keys[:5] == ["map_augment.weight", "map_layer0.weight", "map_layer0.bias", "map_layer1.weight",
                        "map_layer1.bias"]
    assert not any(k.startswith(("map_noise", "map_label")) for k in keys)  # positional: no parameters
    for k in ["enc.32x32_conv.weight", "enc.32x32_conv.bias",
              "enc.32x32_block0.norm0.weight", "enc.32x32_block0.conv0.weight", "enc.32x32_block0.affine.weight",
              "enc.32x32_block0.norm1.bias", "enc.32x32_block0.conv1.weight", "enc.32x32_block0.skip.weight",
              "enc.16x16_down.conv0.resample_filter", "enc.16x16_down.skip.weight",
              "enc.16x16_down.skip.resample_filter",
              "enc.16x16_block3.norm2.weight", "enc.16x16_block3.qkv.weight", "enc.16x16_block3.proj.bias",
              "enc.8x8_block3.conv1.bias",
              "dec.8x8_in0.qkv.weight", "dec.8x8_in1.conv1.weight", "dec.8x8_block4.skip.weight",
              "dec.16x16_up.conv0.resample_filter", "dec.16x16_block4.qkv.weight",
              "dec.32x32_block4.conv1.weight", "dec.32x32_aux_norm.weight", "dec.32x32_aux_norm.bias",
              "dec.32x32_aux_conv.weight", "dec.32x32_aux_conv.bias"]:
        assert k in keys, k
    # Attention: every encoder block at 16x16, only the last decoder block there, and the bottleneck in0.
    assert "enc.32x32_block0.qkv.weight" not in keys
    assert "dec.16x16_block3.qkv.weight" not in keys
    assert "dec.8x8_in1.qkv.weight" not in keys
    # Blocks that keep channels and resolution have no skip conv; no 32x32 down block.
    assert "enc.32x32_block1.skip.weight" not in keys
    assert not any(k.startswith("enc.32x32_down") for k in keys)
    assert list(edm_cifar_aug.enc)[:3] == ["32x32_conv", "32x32_block0", "32x32_block1"]
    assert list(edm_cifar_aug.dec)[:3] == ["8x8_in0", "8x8_in1", "8x8_block0"]
    assert list(edm_cifar_aug.dec)[-2:] == ["32x32_aux_norm", "32x32_aux_conv"]
    shapes = {k: tuple(v.shape) for k, v in edm_cifar_aug.state_dict().items()}
    assert shapes["map_augment.weight"] == (128, 9)
    assert shapes["map_layer0.weight"] == (512, 128)
    assert shapes["enc.32x32_conv.weight"] == (128, 3, 3, 3)  # the stem conv is model_channels wide ...
    assert shapes["enc.32x32_block0.skip.weight"] == (256, 128, 1, 1)  # ... block0 widens to 128 * 2
    assert shapes["dec.16x16_block4.qkv.weight"] == (768, 256, 1, 1)
    assert shapes["dec.32x32_aux_conv.weight"] == (3, 256, 3, 3)


def test_skip_and_residual_layouts():
    skip = meta_unet(**dict(TINY, encoder_type="skip", decoder_type="skip"))
    assert {"8x8_aux_down", "8x8_aux_skip"} <= set(skip.enc)
    assert {"16x16_aux_up", "16x16_aux_norm", "16x16_aux_conv", "8x8_aux_norm", "8x8_aux_conv"} <= set(skip.dec)
    res = meta_unet(**dict(TINY, encoder_type="residual", embedding_type="fourier", channel_mult_noise=2,
                           resample_filter=[1, 3, 3, 1]))
    assert "8x8_aux_residual" in res.enc
    assert "map_noise.freqs" in res.state_dict()  # Fourier frequencies are a buffer
    with pytest.raises(ValueError):
        SongUNet(**dict(TINY, encoder_type="bogus"))


def test_weight_init_modes():
    torch.manual_seed(0)
    fan_in, fan_out = 400, 100
    xavier, kaiming = math.sqrt(2 / (fan_in + fan_out)), math.sqrt(1 / fan_in)
    expected_std = {"xavier_uniform": xavier, "xavier_normal": xavier,
                    "kaiming_uniform": kaiming, "kaiming_normal": kaiming}
    for mode in INIT_MODES:
        w = weight_init([fan_out, fan_in], mode, fan_in, fan_out)
        assert w.shape == (fan_out, fan_in)
        assert w.std().item() == pytest.approx(expected_std[mode], rel=0.05)
    bound = math.sqrt(6 / (fan_in + fan_out))
    assert weight_init([1000], "xavier_uniform", fan_in, fan_out).abs().max() <= bound
    with pytest.raises(ValueError, match="Invalid init mode"):
        weight_init([3], "orthogonal", 1, 1)


def test_songunet_initialisation():
    torch.manual_seed(0)
    net = SongUNet(**TINY)
    blk = net.enc["8x8_block0"]
    assert isinstance(blk, UNetBlock) and blk.num_heads == 1
    # "zero" convs are xavier_uniform * 1e-5; qkv is xavier_uniform * sqrt(0.2); all biases start at 0.
    c1 = blk.conv1.weight
    assert 0 < c1.abs().max() <= 1e-5 * math.sqrt(6 / (2 * 16 * 9))
    qkv_bound = math.sqrt(6 / (16 + 48)) * math.sqrt(0.2)
    assert blk.qkv.weight.abs().max() <= qkv_bound and blk.qkv.weight.abs().max() > 0.8 * qkv_bound
    assert all(torch.all(m.bias == 0) for m in net.modules() if isinstance(m, Conv2d) and m.bias is not None)
    assert torch.all(net.map_layer0.bias == 0)
    assert torch.equal(net.enc["8x8_down"].conv0.resample_filter, torch.full((1, 1, 2, 2), 0.25))
    assert net.enc["8x8_block0"].conv0.resample_filter is None
    # The output conv is ~1e-5, so the untrained output is tiny.
    net.eval()
    out = net(torch.randn(2, 3, 16, 16), torch.zeros(2))
    assert out.abs().max() < 1e-3


@pytest.mark.parametrize("kw", [
    {},
    dict(label_dim=4, augment_dim=3, label_dropout=0.5),
    dict(encoder_type="skip", decoder_type="skip"),
    dict(encoder_type="residual", embedding_type="fourier", channel_mult_noise=2, resample_filter=[1, 3, 3, 1]),
])
def test_songunet_forward_shapes(kw):
    torch.manual_seed(0)
    net = SongUNet(**dict(TINY, out_channels=2, **kw))
    labels = torch.eye(4)[:2] if kw.get("label_dim") else None
    aug = torch.randn(2, 3) if kw.get("augment_dim") else None
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    out = net(x, torch.rand(2), labels, aug)
    assert out.shape == (2, 2, 16, 16)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_positional_embedding_is_edm():
    emb = PositionalEmbedding(8, endpoint=True)
    x = torch.tensor([0.0, 1.0, 2.5])
    freqs = 10000.0 ** (-torch.arange(4) / 3)
    expected = torch.cat([torch.cos(x[:, None] * freqs), torch.sin(x[:, None] * freqs)], dim=1)
    assert torch.allclose(emb(x), expected)


def test_attention_op_gradcheck():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    # Weights are computed in float32 and cast back, hence the loose tolerances.
    assert torch.autograd.gradcheck(AttentionOp.apply, (q, k), eps=1e-3, atol=1e-3, rtol=1e-2)
    w = AttentionOp.apply(q, k)
    assert torch.allclose(w.sum(-1), torch.ones(2, 5, dtype=torch.float64))


def test_conditional_net_without_labels_uses_zero_labels():
    torch.manual_seed(0)
    net = SongUNet(**dict(TINY, label_dim=3)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    assert torch.allclose(net(x, t, None), net(x, t, torch.zeros(2, 3)))
    assert not torch.allclose(net(x, t, torch.eye(3)[:2]), net(x, t, torch.zeros(2, 3)))


def test_fused_attention_is_the_same_function_and_switches_back():
    torch.manual_seed(0)
    net = SongUNet(**TINY).eval()
    with torch.no_grad():
        for p in net.parameters():          # non-zero attention projections (EDM zero-initialises them)
            p.add_(0.05 * torch.randn_like(p))
    x, t = torch.randn(3, 3, 16, 16), torch.rand(3)
    ref = net(x, t)
    keys = list(net.state_dict())
    fused = use_fused_attention(net)(x, t)
    assert any(m.attn_impl == "sdpa" for m in net.modules() if isinstance(m, UNetBlock) and m.num_heads)
    assert list(net.state_dict()) == keys
    assert torch.allclose(fused, ref, atol=1e-5) and not torch.equal(fused, ref.mul(1.5))
    assert torch.equal(use_fused_attention(net, False)(x, t), ref)


def test_autocast_keeps_activations_in_bf16_unless_float32_bias():
    """Under bf16 autocast the conv bias is added in the output dtype (EDM's add_), so every GroupNorm
    sees bf16 (no float32 round trips); use_float32_bias keeps them float32. Without autocast (float32)
    both are the same function bit for bit."""
    torch.manual_seed(0)
    net = SongUNet(**TINY).eval()
    seen: list[torch.dtype] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
             for m in net.modules() if isinstance(m, GroupNorm)]
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    ref = net(x, t)
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = net(x, t)
    assert seen and set(seen) == {torch.bfloat16} and low.dtype == torch.bfloat16
    use_float32_bias(net)
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f32 = net(x, t)
    assert set(seen) == {torch.float32} and f32.dtype == torch.float32
    assert torch.equal(net(x, t), ref)
    assert (f32 - ref).abs().max() < 0.1 and (low.float() - ref).abs().max() < 0.1
    use_float32_bias(net, False)
    assert all(not m.float32_bias for m in net.modules() if isinstance(m, Conv2d))
    for h in hooks:
        h.remove()


@pytest.mark.parametrize("kernel,up,down,fused", [(0, True, False, False), (0, False, True, False),
                                                  (1, True, False, False), (1, False, True, False),
                                                  (3, True, False, False), (3, False, True, False),
                                                  (3, True, False, True), (3, False, True, True)])
def test_box_resampling_is_edms_grouped_convolution(kernel, up, down, fused):
    """With resample_filter=[1, 1] the layer upsamples by nearest neighbour / downsamples by 2x2 average
    pooling: the same values as EDM's grouped (transposed) convolutions, in EDM's order of resampling and
    convolving (the fused path convolves before pooling)."""
    torch.manual_seed(0)
    conv = Conv2d(6, 6 if kernel == 0 else 5, kernel=kernel, up=up, down=down, fused_resample=fused, init_bias=1)
    assert conv.box and list(conv.state_dict()) == (["weight", "bias"] if kernel else []) + ["resample_filter"]
    x = torch.randn(2, 6, 8, 8)
    fast = conv(x)
    ref = use_box_resampling(conv, False)(x)          # EDM's grouped convolutions
    assert not conv.box and use_box_resampling(conv).box
    assert fast.shape == ref.shape == (2, conv.out_channels, 16 if up else 4, 16 if up else 4)
    if kernel == 0 and up:
        assert torch.equal(fast, ref)
    assert torch.allclose(fast, ref, atol=1e-6) and not torch.allclose(fast, ref + 1e-3)


def test_songunet_with_box_resampling_is_the_same_function():
    torch.manual_seed(0)
    net = SongUNet(**TINY).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t = torch.randn(3, 3, 16, 16), torch.rand(3)
    assert sum(m.box for m in net.modules() if isinstance(m, Conv2d)) == 4    # conv0 + skip, down and up
    keys = list(net.state_dict())
    fast = net(x, t)
    ref = use_box_resampling(net, False)(x, t)
    assert list(net.state_dict()) == keys
    assert torch.allclose(fast, ref, atol=1e-5) and not torch.allclose(fast, ref.mul(1.01), atol=1e-5)


def test_non_box_filters_keep_the_grouped_convolution():
    conv = Conv2d(4, 4, kernel=0, down=True, resample_filter=[1, 3, 3, 1])
    assert not conv.box and not Conv2d(4, 4, kernel=3).box and not use_box_resampling(conv).box
    x = torch.randn(1, 4, 8, 8)
    f = torch.tensor([1., 3, 3, 1])
    f = torch.outer(f, f)[None, None] / f.sum() ** 2
    assert torch.allclose(conv(x), torch.nn.functional.conv2d(x, f.tile(4, 1, 1, 1), groups=4, stride=2, padding=1))


def test_fused_attention_gets_unit_stride_inputs(monkeypatch):
    """SDPA's fused kernels need a unit stride in q, k, v's last dim (else its math path runs them as
    float32 matmuls): the block hands it contiguous (N*heads, 1, L, C/heads) tensors."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        seen.append([(t.shape, t.stride(-1), t.is_contiguous()) for t in (q, k, v)])
        return sdpa(q, k, v, *a, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    block = use_fused_attention(UNetBlock(16, 16, emb_channels=8, attention=True, channels_per_head=8))
    block(torch.randn(2, 16, 4, 4).contiguous(memory_format=torch.channels_last), torch.randn(2, 8))
    assert seen == [[(torch.Size([4, 1, 16, 8]), 1, True)] * 3]
