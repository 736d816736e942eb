"""KDM for images: U-Net, model and training configs, and the official presets.

The presets reproduce the official image configs (azencot-group/KDM): three EDM DDPM++ SongUNets
(model_channels 64 at 32x32 and 32 at 64x64, channel_mult 1,2,2,2, 4 blocks, attention at 16x16,
dropout 0.10), 1-channel latents, a 512-d linear projection at 64x64, latent noise std 0.4,
x_T = 80 * eps and adversarial weight 0.01. Trainable parameters (discriminator and LPIPS excluded):

| preset | trainable |
|---|---|
| cifar10-uncond | 47,476,165 |
| cifar10-uncond-f | 50,622,917 |
| cifar10-cond | 47,489,541 |
| ffhq64, afhq64 | 18,203,365 |
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_serializer, model_validator

from .common import SCHEMA_VERSION, Strict, VersionInputs, drop_unset
from .multistep import (ANCHOR_RHO_DOC, MULTISTEP_FIELDS, TRAJECTORY_EVERY_DOC, TRAJECTORY_OUTPUT_DOC,
                        MultiStepRun, nfe_train_problem)
from .pairs import Snapshots
from .perceptual import PerceptualNetRef


class SongUNetConfig(Strict):
    """EDM ``SongUNet`` hyperparameters; resolution, channels and label_dim come from the model config."""

    model_channels: int = Field(64, ge=1)
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    channel_mult_emb: int = Field(4, ge=1)
    channel_mult_noise: int = Field(1, ge=1)
    num_blocks: int = Field(4, ge=1, description="residual blocks per resolution (decoder: num_blocks + 1)")
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = Field(0.10, ge=0, lt=1)
    label_dropout: float = Field(0.0, ge=0, lt=1)
    embedding_type: Literal["positional", "fourier"] = "positional"
    encoder_type: Literal["standard", "skip", "residual"] = "standard"
    decoder_type: Literal["standard", "skip"] = "standard"
    resample_filter: tuple[int, ...] = (1, 1)

    @model_validator(mode="after")
    def _shape(self) -> "SongUNetConfig":
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError("channel_mult must be a non-empty list of positive integers")
        if not self.resample_filter:
            raise ValueError("resample_filter must not be empty")
        return self


class KDMImageConfig(Strict):
    """KDM image student: E_phi, E_varphi, D_psi (SongUNets), Koopman operator, control, loss knobs."""

    kind: Literal["kdm-image"] = "kdm-image"
    img_resolution: int = Field(32, ge=4)
    channels: int = Field(3, ge=1)
    latent_channels: int = Field(1, ge=1, description="output channels of the encoder UNets")
    unet: SongUNetConfig = SongUNetConfig()
    latent_proj_dim: Optional[int] = Field(
        None, ge=1, description="linear projection of the flattened latent map to this size (official: 512 at 64x64)")
    operator: Literal["linear", "factorized"] = "linear"
    spectral_loss: Literal["none", "inverse", "unit-disk-uniform"] = Field(
        "none", description="KDM-F only: penalty on P_inv P and/or the eigenvalues (weight 1)")
    label_dim: int = Field(0, ge=0, description="number of classes; 0 = unconditional")
    control: bool = Field(True, description="add C_mu(y) = Linear(label_dim, d) after the push (label_dim > 0)")
    latent_noise: float = Field(0.4, ge=0, description="std of the Gaussian noise added to z_0 and z_T in training")
    noise_scale: float = Field(80.0, gt=0, description="x_T = noise_scale * eps (EDM sigma_max)")
    time_T: float = Field(1.0, description="constant time input of E_varphi (E_phi and D_psi get 0)")
    distance: Literal["pseudo-huber", "lpips", "mse", "lpips-own"] = Field(
        "lpips", description="d(x_0, x_hat) of L_rec and L_pred; L_lat is always MSE. 'lpips' is LPIPS-VGG16 "
                             "(ImageNet weights needed); 'lpips-own' the LPIPS-style distance on the pipeline's own "
                             "perceptual network (train.perceptual_net), never the evaluation's FD extractor")
    pseudo_huber_c: float = Field(0.03, gt=0)
    adv_weight: float = Field(0.01, ge=0, description="weight of the generator's adversarial term; 0 disables D")
    adv_start: float = Field(0.0, ge=0, le=1, description="fraction of train.steps before the generator's "
                                                          "adversarial term starts (D trains from step 0); 0: "
                                                          "from the start (official)")
    adv_rampup: float = Field(0.0, ge=0, le=1, description="fraction of train.steps over which the adversarial "
                                                           "weight ramps linearly from 0 to adv_weight after "
                                                           "adv_start; 0: at once (official)")
    nfe_train: Optional[tuple[int, ...]] = Field(
        None, description="multi-step student (models.multistep): the NFEs it samples with, each trained on the pair "
                          "store's trajectory snapshots, e.g. [1, 2, 4]; None: the one-step student")
    trajectory_rows: Optional[int] = Field(
        None, ge=1, description="multi-step student: rows of each batch that train the trajectory terms (None: all)")

    trajectory_output: Optional[bool] = Field(None, description=TRAJECTORY_OUTPUT_DOC)
    anchor_rho: Optional[float] = Field(None, ge=1, description=ANCHOR_RHO_DOC)
    trajectory_every: Optional[int] = Field(None, ge=1, description=TRAJECTORY_EVERY_DOC)

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):        # versions of one-step students stay what they were
        return drop_unset(handler(self), MULTISTEP_FIELDS)

    @model_validator(mode="after")
    def _consistent(self) -> "KDMImageConfig":
        if (self.adv_start or self.adv_rampup) and not self.adv_weight:
            raise ValueError("adv_start / adv_rampup schedule the adversarial term: set adv_weight > 0 (or leave "
                             "them at 0)")
        if self.adv_start + self.adv_rampup > 1:
            raise ValueError(f"adv_start + adv_rampup = {self.adv_start + self.adv_rampup:g} exceeds 1: the "
                             f"adversarial weight would never reach adv_weight within train.steps")
        if self.spectral_loss != "none" and self.operator != "factorized":
            raise ValueError("spectral_loss requires operator='factorized' (KDM-F)")
        problem = nfe_train_problem(self)
        if problem:
            raise ValueError(problem)
        levels = len(self.unet.channel_mult)
        if self.img_resolution % (1 << (levels - 1)):
            raise ValueError(f"img_resolution {self.img_resolution} is not divisible by 2^{levels - 1} "
                             f"(channel_mult has {levels} levels)")
        return self

    def adv_weight_at(self, step: int, steps: int) -> float:
        """The generator's adversarial weight at optimisation step ``step`` (0-based) of ``steps``: 0 before
        ``adv_start * steps``, then a linear ramp over ``adv_rampup * steps`` steps up to ``adv_weight``."""
        start, ramp = self.adv_start * steps, self.adv_rampup * steps
        if step < start:
            return 0.0
        if ramp <= 0:
            return self.adv_weight
        return self.adv_weight * min(1.0, (step - start + 1) / ramp)

    @property
    def latent_dim(self) -> int:
        return self.latent_proj_dim or self.latent_channels * self.img_resolution ** 2


class ImageTrainConfig(Strict):
    """Official optimisation (Adam 3e-4 for both nets, batch 128, 800k steps, EMA 0.9999) plus engine settings.

    ``batch_size`` is the global batch: with N processes (torchrun) each takes batch_size / N. The engine
    settings (precision, tf32, channels_last, compile, cuda_graphs, data reader) change speed, not the recipe;
    precision='fp32' with tf32=False and channels_last=False is the official numerics. On one GPU the
    default engine replays the step as a CUDA graph (``cuda_graphs``); with it, channels_last=False is faster.
    """

    lr: float = Field(3e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    disc_lr: float = Field(3e-4, gt=0, description="discriminator Adam learning rate (same betas)")
    batch_size: int = Field(128, ge=1)
    steps: int = Field(800_000, ge=1)
    ema_decay: float = Field(0.9999, ge=0, lt=1)
    sanitize_grads: bool = Field(True, description="nan_to_num on generator gradients (NaN->0, +-inf->+-1e5)")
    grad_clip: Optional[float] = Field(None, gt=0, description="max gradient norm; None = no clipping (official)")
    checkpoint_every: int = Field(20_000, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(200, ge=1)
    seed: int = 0
    device: Literal["cpu", "cuda"] = "cuda"
    threads: int = Field(0, ge=0, description="torch intra-op threads; 0 = torch default")
    precision: Literal["bf16", "fp32"] = Field(
        "bf16", description="bf16 autocast with fp32 master weights, or plain fp32 (official)")
    tf32: bool = Field(True, description="TF32 matmuls/convolutions for the fp32 parts (CUDA)")
    channels_last: bool = Field(True, description="NHWC memory format for the U-Nets and the discriminator")
    compile: bool = Field(False, description="torch.compile the three U-Nets (in place)")
    cuda_graphs: Optional[bool] = Field(
        None, description="capture the whole training step (forward, backward, both optimizer steps, EMA) as "
                          "one CUDA graph after 3 eager warm-up steps; the non-finite guard then runs on the "
                          "GPU (no host sync). One GPU, one process. None (default): on exactly then, with "
                          "compile off, for a one-step student; a multi-step student's captured step only when "
                          "True; True with compile=True captures the compiled U-Nets (a speed variant, "
                          "bench/bench_kdm_image.py graphs-compile)")
    buffer_chunks: int = Field(8, ge=1, description="pair-store chunks read and shuffled together")
    read_threads: int = Field(8, ge=1, description="threads reading pair-store chunks")
    vgg16_weights: Optional[str] = Field(
        None, description="VGG16 ImageNet weights for distance 'lpips' (default: torch hub's cache file)")
    perceptual_net: Optional[str] = Field(
        None, description="URI of the perceptual network artifact for distance 'lpips-own' "
                          "(pipeline.training.perceptual.train_perceptual_net); the run version pins the network "
                          "by its id and weights sha256, not by this location")

    @model_validator(mode="after")
    def _graphs_need_cuda(self):
        if self.cuda_graphs and self.device != "cuda":
            raise ValueError(f"cuda_graphs=True needs device='cuda', not {self.device!r}")
        return self


# Fields that change speed or bookkeeping, not the trained weights' recipe (left out of run versions).
IMAGE_TRAIN_RUNTIME_FIELDS = frozenset({"device", "threads", "log_every", "checkpoint_every", "keep_checkpoints",
                                        "compile", "cuda_graphs", "read_threads",
                                        "vgg16_weights", "perceptual_net"})


class ImageStudentManifest(MultiStepRun, Strict):
    """manifest.json of a finished image training run (written last)."""

    format: Literal["kdm-image-student"] = "kdm-image-student"
    schema_version: int = SCHEMA_VERSION
    version: str
    version_inputs: Optional[VersionInputs] = Field(
        None, description="what the version hashes; every read recomputes it (absent in runs from before it existed)")
    model: KDMImageConfig
    train: ImageTrainConfig
    preset: str
    pairs_version: str
    pairs_content_hash: str
    teacher_id: Optional[str] = None
    steps_done: int
    nonfinite_steps: int = 0
    weights_file: str = "student.safetensors"
    weights_sha256: str
    weights_are_ema: bool = True
    trainable_parameters: int
    discriminator_parameters: int = 0
    distance_name: Optional[str] = Field(
        None, description="the training distance as reports name it, e.g. 'pseudo-huber(c=0.03)', 'lpips-vgg16', "
                          "'lpips-own:<network id>'")
    distance_net: Optional[PerceptualNetRef] = Field(
        None, description="distance 'lpips-own': the perceptual network (id, weights sha256) it ran on")
    world_size: int = 1
    snapshots: Optional[Snapshots] = Field(
        None, description="multi-step students: the trajectory snapshots of the pairs it was trained on "
                          "(None: one-step)")
    final_losses: dict[str, float]
    train_seconds: float
    steady_pairs_per_s: Optional[float] = Field(
        None, description="training throughput of the last session in steady state: pairs over the seconds of "
                          "its log intervals that began after warm-up (cuDNN autotuning, compilation, CUDA-graph "
                          "capture), checkpoint writes and hooks left out; comparable with bench/bench_kdm_image.py")
    code_version: str
    created: str

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        return drop_unset(handler(self), ("snapshots",))

    @model_validator(mode="after")
    def _version_is_its_inputs_hash(self) -> "ImageStudentManifest":
        if self.version_inputs is not None:
            self.version_inputs.check(self.version, pairs_version=self.pairs_version)
        return self


def distance_label(model: KDMImageConfig, net: Optional[PerceptualNetRef] = None) -> str:
    """The training distance as manifests and reports name it ('lpips-own:<network id>' for the own network)."""
    if model.distance == "pseudo-huber":
        return f"pseudo-huber(c={model.pseudo_huber_c:g})"
    if model.distance == "lpips":
        return "lpips-vgg16"
    if model.distance == "lpips-own":
        return f"lpips-own:{net.id if net is not None else '?'}"
    return model.distance


def _variant(base: KDMImageConfig, **changes) -> KDMImageConfig:
    """A validated copy of ``base`` with some fields changed."""
    return KDMImageConfig.model_validate({**base.model_dump(), **changes})


_CIFAR = KDMImageConfig()
_FACES = KDMImageConfig(img_resolution=64, unet=SongUNetConfig(model_channels=32), latent_proj_dim=512)

IMAGE_PRESETS: dict[str, KDMImageConfig] = {
    "cifar10-uncond": _CIFAR,
    "cifar10-uncond-f": _variant(_CIFAR, operator="factorized", spectral_loss="unit-disk-uniform"),
    "cifar10-cond": _variant(_CIFAR, label_dim=10),
    "ffhq64": _FACES,
    "afhq64": _FACES,
}


def image_preset(name: str) -> KDMImageConfig:
    try:
        return IMAGE_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown image preset {name!r}; valid: {', '.join(IMAGE_PRESETS)}") from None
