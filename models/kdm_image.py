"""KDM for images: x_0 ~= D_psi(C_eta E_varphi(x_T, T, y) + C_mu(y), 0, y) (paper Alg. 1-2, App. E).

As the official image models:

* three independent EDM ``SongUNet``s: E_phi(x_0, t=0, y) and E_varphi(x_T, t=T=1, y) map the image to
  a ``latent_channels``-channel map (1 channel: d = R*R, i.e. 1024 at 32x32), D_psi(z, t=0, y) maps it
  back to the image channels. The time inputs are constants, so they only act as learned biases.
* optional latent projection (official ``linear_proj``, FFHQ/AFHQ: 512): EDM ``Linear`` (xavier_uniform
  weight, zero bias) after the encoder UNet (flattened map -> d) and before the decoder UNet (d -> map);
* Koopman operator (``models.koopman.make_operator``) on the flattened latent;
* Gaussian noise of std ``latent_noise`` (0.4) on both latents in training; the push uses the noisy z_T;
  sampling adds none;
* one training pass (``forward``, Alg. 1) for every caller: the training engine
  (``pipeline.training.image_train``) calls it, under DistributedDataParallel when it runs several
  processes. By default the decoder runs once on the concatenation [z0_noisy; z_push] (the official code
  calls it twice; the decoder has no batch-coupled layers, so it is the same function: without dropout
  equal up to float rounding, as a different batch size may change the order of the sums inside the
  convolutions; with dropout the masks are drawn in another order, from the same distribution);
* class conditioning (``label_dim`` > 0): one-hot labels go to all three UNets (``map_label``) and, with
  ``control=True``, the control term C_mu(y) = ``nn.Linear(label_dim, d)`` is added after the push. It is
  sized from the latent (the official code hard-codes 32*32);
* x_T = ``noise_scale`` * eps with eps ~ N(0, I) and noise_scale = 80 (EDM's sigma_max).
* multi-step sampling (``intervals`` > 1, ``nfe_train``; ``models.multistep``): a trajectory encoder and
  decoder (two more SongUNets of the same settings, whose noise label is the grid level tau of the state)
  and one operator per trained segment (plus the control term); ``generate(x_T, labels, nfe)`` re-anchors on
  its own decoded intermediate predictions. NFE = 1 is the one-step map above.

Latents are kept flattened, shape (B, d).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from .kdm2d import KDMForward, add_latent_noise
from .koopman import make_operator
from .multistep import decoder_of, encoder_of, rollout, segment_operator, set_trajectory
from .songunet import Linear, SongUNet

# SongUNet settings shared by the three networks of every official image config (notes Sec. 1.1).
OFFICIAL_UNET = dict(model_channels=64, channel_mult=(1, 2, 2, 2), channel_mult_emb=4, channel_mult_noise=1,
                     num_blocks=4, attn_resolutions=(16,), dropout=0.10, label_dropout=0.0,
                     embedding_type="positional", encoder_type="standard", decoder_type="standard",
                     resample_filter=(1, 1))


def _time(x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """The UNet's noise label per row: a constant ``t``, or one value per row (a (B,) tensor)."""
    if torch.is_tensor(t):
        return t.to(device=x.device, dtype=x.dtype).reshape(x.shape[0])
    return torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)


class LatentEncoder(nn.Module):
    """SongUNet image -> ``latent_channels`` maps, flattened, then optionally projected to ``proj_dim``."""

    def __init__(self, img_resolution: int, in_channels: int, latent_channels: int, label_dim: int,
                 unet: Mapping[str, Any], proj_dim: int | None = None):
        super().__init__()
        self.unet = SongUNet(img_resolution, in_channels, latent_channels, label_dim=label_dim, **unet)
        flat = latent_channels * img_resolution * img_resolution
        self.proj = Linear(flat, proj_dim, init_mode="xavier_uniform") if proj_dim else None
        self.latent_dim = proj_dim or flat

    def forward(self, x: torch.Tensor, t: float | torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        z = self.unet(x, _time(x, t), labels).flatten(1)
        return self.proj(z) if self.proj is not None else z


class LatentDecoder(nn.Module):
    """Optional projection ``proj_dim`` -> maps, then SongUNet maps -> image."""

    def __init__(self, img_resolution: int, out_channels: int, latent_channels: int, label_dim: int,
                 unet: Mapping[str, Any], proj_dim: int | None = None):
        super().__init__()
        self.latent_shape = (latent_channels, img_resolution, img_resolution)
        flat = latent_channels * img_resolution * img_resolution
        self.proj = Linear(proj_dim, flat, init_mode="xavier_uniform") if proj_dim else None
        self.unet = SongUNet(img_resolution, latent_channels, out_channels, label_dim=label_dim, **unet)
        self.latent_dim = proj_dim or flat

    def forward(self, z: torch.Tensor, t: float | torch.Tensor = 0.0,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.proj is not None:
            z = self.proj(z)
        z = z.reshape(z.shape[0], *self.latent_shape)
        return self.unet(z, _time(z, t), labels)


class KDMImage(nn.Module):
    def __init__(self, img_resolution: int = 32, channels: int = 3, latent_channels: int = 1,
                 unet: Mapping[str, Any] | None = None, latent_proj_dim: int | None = None,
                 operator: str = "linear", label_dim: int = 0, control: bool = True,
                 latent_noise: float = 0.4, noise_scale: float = 80.0, time_T: float = 1.0, intervals: int = 1,
                 nfe_train: tuple[int, ...] = (1,), anchor_rho: float = 1.0):
        super().__init__()
        unet = dict(OFFICIAL_UNET if unet is None else unet)
        self.img_resolution, self.channels, self.label_dim = img_resolution, channels, label_dim
        self.latent_noise, self.noise_scale, self.time_T = latent_noise, noise_scale, time_T
        self.x0_encoder = LatentEncoder(img_resolution, channels, latent_channels, label_dim, unet, latent_proj_dim)
        self.xT_encoder = LatentEncoder(img_resolution, channels, latent_channels, label_dim, unet, latent_proj_dim)
        self.decoder = LatentDecoder(img_resolution, channels, latent_channels, label_dim, unet, latent_proj_dim)
        self.latent_dim = self.x0_encoder.latent_dim
        self.koopman = make_operator(operator, self.latent_dim)
        self.control = nn.Linear(label_dim, self.latent_dim) if label_dim and control else None
        net = (img_resolution, channels, latent_channels, label_dim, unet, latent_proj_dim)
        set_trajectory(self, intervals, nfe_train, lambda: make_operator(operator, self.latent_dim),
                       lambda: LatentEncoder(*net), lambda: LatentDecoder(*net), anchor_rho)

    @classmethod
    def from_config(cls, cfg, intervals: int = 1) -> "KDMImage":
        """Build from a ``storage_schemas.kdm_image.KDMImageConfig`` (or anything with its fields); ``intervals``:
        of the trajectory grid a multi-step student is trained on."""
        u = cfg.unet
        unet = dict(model_channels=u.model_channels, channel_mult=tuple(u.channel_mult),
                    channel_mult_emb=u.channel_mult_emb, channel_mult_noise=u.channel_mult_noise,
                    num_blocks=u.num_blocks, attn_resolutions=tuple(u.attn_resolutions), dropout=u.dropout,
                    label_dropout=u.label_dropout, embedding_type=u.embedding_type,
                    encoder_type=u.encoder_type, decoder_type=u.decoder_type,
                    resample_filter=tuple(u.resample_filter))
        return cls(img_resolution=cfg.img_resolution, channels=cfg.channels, latent_channels=cfg.latent_channels,
                   unet=unet, latent_proj_dim=cfg.latent_proj_dim, operator=cfg.operator,
                   label_dim=cfg.label_dim, control=cfg.control, latent_noise=cfg.latent_noise,
                   noise_scale=cfg.noise_scale, time_T=cfg.time_T, intervals=intervals,
                   nfe_train=tuple(getattr(cfg, "nfe_train", None) or (1,)),
                   anchor_rho=getattr(cfg, "anchor_rho", None) or 1.0)

    # -- labels -------------------------------------------------------------------------------------
    def prepare_labels(self, labels: torch.Tensor | None, batch: int, like: torch.Tensor) -> torch.Tensor | None:
        """Class ids (B,) or one-hot rows (B, label_dim) -> float one-hot; None for unconditional models.

        Labels given to an unconditional model are ignored (as the official ``Uncond`` mode); a
        conditional model without labels gets all-zero rows (EDM's convention for "no class").
        """
        if not self.label_dim:
            return None
        if labels is None:
            return like.new_zeros(batch, self.label_dim)
        if labels.dim() == 1 and not labels.is_floating_point():
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.label_dim):
                raise ValueError(f"class ids must lie in [0, {self.label_dim}), got {labels.min()}..{labels.max()}")
            labels = F.one_hot(labels.long(), self.label_dim)
        if labels.shape != (batch, self.label_dim):
            raise ValueError(f"labels must be class ids (B,) or one-hot (B, {self.label_dim}); "
                             f"got shape {tuple(labels.shape)} for batch {batch}")
        return labels.to(device=like.device, dtype=like.dtype)

    # -- passes -------------------------------------------------------------------------------------
    def push(self, zT: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Koopman step C_eta z_T, plus the control term C_mu(y) when conditional."""
        z = self.koopman(zT)
        if self.control is not None:
            z = z + self.control(labels)
        return z

    def forward(self, x0: torch.Tensor, xT: torch.Tensor, labels: torch.Tensor | None = None,
                decode_push: bool = True, generator: torch.Generator | None = None, *,
                eps0: torch.Tensor | None = None, epsT: torch.Tensor | None = None,
                fuse_decoder: bool = True, spectral: str = "none") -> KDMForward:
        """Training pass (Alg. 1): noisy latents, push of the noisy z_T, decoder on z0_noisy and the push.

        ``labels``: class ids (B,) or one-hot rows (B, label_dim) (``prepare_labels``). The latent noise
        is ``eps0``/``epsT`` (shape (B, latent_dim)) when given, else drawn from ``generator`` after both
        encoders, eps0 first; it is added in at least fp32, so under bf16 autocast z0_noisy and zT_noisy
        are fp32. ``fuse_decoder``: one decoder call on [z0_noisy; z_push] (default) or two calls, as the
        official code. ``decode_push=False`` decodes z0_noisy only (x0_push None). ``spectral`` names the
        KDM-F penalty returned in ``spectral`` ('none': None), computed outside autocast.
        """
        y = self.prepare_labels(labels, x0.shape[0], x0)
        z0 = self.x0_encoder(x0, 0.0, y)
        zT = self.xT_encoder(xT, self.time_T, y)
        z0_noisy = add_latent_noise(z0, self.latent_noise, eps0, generator)
        zT_noisy = add_latent_noise(zT, self.latent_noise, epsT, generator)
        z_push = self.push(zT_noisy, y)
        if decode_push and fuse_decoder:
            y2 = None if y is None else torch.cat([y, y])
            x0_rec, x0_push = self.decoder(torch.cat([z0_noisy, z_push.to(z0_noisy.dtype)]), 0.0, y2).chunk(2)
        else:
            x0_rec = self.decoder(z0_noisy, 0.0, y)
            x0_push = self.decoder(z_push, 0.0, y) if decode_push else None
        spec = self.spectral_loss(spectral) if spectral != "none" else None
        return KDMForward(z0, zT, z0_noisy, zT_noisy, z_push, x0_rec, x0_push, spec)

    def generate(self, xT: torch.Tensor, labels: torch.Tensor | None = None, nfe: int = 1) -> torch.Tensor:
        """Sampling, deterministic given x_T (already scaled: x_T = noise_scale * eps): NFE = 1 is Alg. 2, a
        multi-step student samples with any NFE it was trained for (``models.multistep.rollout``)."""
        y = self.prepare_labels(labels, xT.shape[0], xT)
        if nfe == 1:
            return self.decoder(self.push(self.xT_encoder(xT, self.time_T, y), y), 0.0, y)
        return rollout(self, xT, nfe, y)

    # -- the pieces models.multistep uses (labels already prepared) -------------------------------------
    def encode_state(self, x: torch.Tensor, tau: torch.Tensor, labels=None, *, net: str) -> torch.Tensor:
        """E_varphi(x_T, T), E_phi(x_0, 0), or the trajectory encoder's E_traj(s, tau) between (noise label tau)."""
        return encoder_of(self, net)(x, tau, labels)

    def decode_state(self, z: torch.Tensor, tau: torch.Tensor, labels=None, *, net: str) -> torch.Tensor:
        """D_psi(z, 0) at x_0, the trajectory decoder D_traj(z, tau) between."""
        return decoder_of(self, net)(z, tau, labels)

    def advance(self, z: torch.Tensor, i: int, j: int, labels=None) -> torch.Tensor:
        """The operator of grid segment (i, j), plus the control term C_mu(y) when conditional."""
        z = segment_operator(self, i, j)(z)
        if self.control is not None:
            z = z + self.control(labels)
        return z

    def sample_noise(self, n: int, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
        """x_T = noise_scale * eps, eps ~ N(0, I), shape (n, channels, R, R)."""
        shape = (n, self.channels, self.img_resolution, self.img_resolution)
        return self.noise_scale * torch.randn(shape, generator=generator, device=device)

    def spectral_loss(self, kind: str) -> torch.Tensor:
        """The KDM-F spectral penalty of the operator, in fp32 (outside any autocast)."""
        device = next(self.koopman.parameters()).device
        with torch.autocast(device.type, enabled=False):
            return self.koopman.spectral_loss(kind)

    # -- bookkeeping --------------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters per top-level module (buffers excluded)."""
        names = ["x0_encoder", "xT_encoder", "decoder", "koopman"] + (["control"] if self.control is not None else []) \
            + (["traj_encoder", "traj_decoder", "segment_ops"] if self.segment_ops is not None else [])
        return {n: sum(p.numel() for p in getattr(self, n).parameters() if p.requires_grad) for n in names}
