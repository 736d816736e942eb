"""Teacher artifact: ``weights.safetensors`` + ``config.json`` + ``manifest.json`` (written last).

Two teacher kinds share the artifact layout and the manifest:

* ``flow-matching-mlp``: the 2-D velocity MLP (config FlowMatchingMLPConfig);
* ``edm``: an EDM preconditioned denoiser around a SongUNet (config EDMNetConfig), either bootstrapped by
  ``kdm teacher bootstrap`` (training config EDMTeacherTrainConfig) or imported from a released EDM
  network pickle (``source``). The weights are the preconditioner's state_dict, so the keys are EDM's
  (``model.enc.32x32_conv.weight`` ...).
"""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import Field, model_validator

from .common import SCHEMA_VERSION, Strict, VersionInputs
from .datasets import DatasetRef
from .kdm_image import SongUNetConfig


class CheckerboardSpec(Strict):
    """The official KDM board: x1 ~ U(-2, 2), x2 in cells with floor(x1)+floor(x2) even, / scale."""

    low: float = -2.0
    high: float = 2.0
    scale: float = Field(0.45, gt=0)


class FlowMatchingMLPConfig(Strict):
    """Velocity MLP v(x, t) for the conditional OT path x_t = (1 - t) x_noise + t x_data."""

    kind: Literal["flow-matching-mlp"] = "flow-matching-mlp"
    dim: int = Field(2, ge=1)
    hidden: int = Field(512, ge=8)
    layers: int = Field(4, ge=1, description="hidden Swish layers")


class TeacherTrainConfig(Strict):
    preset: str = "custom"
    model: FlowMatchingMLPConfig = FlowMatchingMLPConfig()
    data: CheckerboardSpec = CheckerboardSpec()
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(4096, ge=1)
    steps: int = Field(3000, ge=1)
    seed: int = 0
    device: Literal["cpu", "cuda"] = "cpu"
    log_every: int = Field(100, ge=1)


# Keyword arguments of EDM's preconditioners besides the interface (img_resolution, img_channels,
# label_dim, use_fp16, model_type) and the U-Net's own; values are EDM's defaults.
PRECOND_DEFAULTS: dict[str, dict[str, float]] = {
    "vp": {"beta_d": 19.9, "beta_min": 0.1, "M": 1000, "epsilon_t": 1e-5},
    "ve": {"sigma_min": 0.02, "sigma_max": 100.0},
    "edm": {"sigma_min": 0.0, "sigma_max": float("inf"), "sigma_data": 0.5},
}
PRECOND_CLASSES = {"vp": "VPPrecond", "ve": "VEPrecond", "edm": "EDMPrecond"}


class EDMNetConfig(Strict):
    """An EDM preconditioner (training/networks.py VPPrecond | VEPrecond | EDMPrecond) around a SongUNet.

    ``precond_kwargs`` holds only the preconditioner arguments that differ from EDM's defaults
    (PRECOND_DEFAULTS), under EDM's names; infinity cannot be stored in JSON, so EDMPrecond's default
    sigma_max=inf is never written.
    """

    kind: Literal["edm"] = "edm"
    precond: Literal["vp", "ve", "edm"] = "edm"
    img_resolution: int = Field(32, ge=4)
    img_channels: int = Field(3, ge=1)
    label_dim: int = Field(0, ge=0, description="number of classes; 0 = unconditional")
    use_fp16: bool = Field(False, description="run the U-Net in float16 on CUDA (EDM's use_fp16)")
    precond_kwargs: dict[str, float] = Field(default_factory=dict)
    augment_dim: int = Field(0, ge=0, description="augmentation-label width of the U-Net (EDM CIFAR: 9)")
    unet: SongUNetConfig = SongUNetConfig()

    @model_validator(mode="after")
    def _known_kwargs(self) -> "EDMNetConfig":
        allowed = PRECOND_DEFAULTS[self.precond]
        unknown = sorted(set(self.precond_kwargs) - set(allowed))
        if unknown:
            raise ValueError(f"precond_kwargs {unknown} are not arguments of {PRECOND_CLASSES[self.precond]} "
                             f"(valid: {', '.join(allowed)})")
        levels = len(self.unet.channel_mult)
        if self.img_resolution % (1 << (levels - 1)):
            raise ValueError(f"img_resolution {self.img_resolution} is not divisible by 2^{levels - 1} "
                             f"(unet.channel_mult has {levels} levels)")
        return self

    @property
    def precond_class(self) -> str:
        return PRECOND_CLASSES[self.precond]


class EDMTeacherTrainConfig(Strict):
    """Training recipe of an EDM teacher (EDM's training_loop.py), presets under configs/teacher/.

    Image size, channels and (with use_labels) label_dim come from the dataset. Step-based: EDM's
    ``duration`` of D images is ``steps = D / batch_size``; EMA half-life and learning-rate ramp-up are
    counted in images as in EDM. Not implemented: EDM's geometric AugmentPipe (augment_dim stays 0);
    ``xflip`` is the dataset-level horizontal flip.
    """

    kind: Literal["edm-teacher"] = "edm-teacher"
    preset: str = "custom"
    precond: Literal["vp", "ve", "edm"] = "edm"
    unet: SongUNetConfig = SongUNetConfig(model_channels=128, channel_mult=(2, 2, 2), dropout=0.13)
    use_labels: bool = Field(False, description="class-conditional teacher (label_dim = number of classes)")
    P_mean: float = Field(-1.2, description="EDMLoss: ln(sigma) ~ N(P_mean, P_std^2)")
    P_std: float = Field(1.2, gt=0)
    sigma_data: float = Field(0.5, gt=0)
    xflip: bool = Field(False, description="random horizontal flips of the training images")
    batch_size: int = Field(512, ge=1, description="images per optimizer step")
    steps: int = Field(390_625, ge=1, description="optimizer steps (EDM CIFAR: 200M images / 512)")
    lr: float = Field(1e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1e-8, gt=0)
    lr_rampup_images: int = Field(10_000_000, ge=0, description="linear warm-up of the learning rate, in images")
    ema_halflife_images: int = Field(500_000, ge=1)
    ema_rampup_ratio: Optional[float] = Field(0.05, gt=0, description="EMA half-life <= ratio * images seen")
    sanitize_grads: bool = Field(True, description="nan_to_num on gradients (NaN->0, +-inf->+-1e5), as EDM")
    precision: Literal["bf16", "fp32"] = Field("bf16", description="bf16 autocast of the U-Net on CUDA")
    tf32: bool = True
    compile: bool = Field(False, description="torch.compile the training forward (CUDA)")
    preview_samples: int = Field(64, ge=0, description="EMA samples (18-step Heun) saved as preview.png")
    checkpoint_every: int = Field(2000, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(100, ge=1)
    seed: int = 0
    device: Literal["cpu", "cuda"] = "cuda"
    threads: int = Field(0, ge=0, description="torch intra-op threads; 0 = torch default")


# Fields of EDMTeacherTrainConfig that change speed or bookkeeping, not the teacher (left out of its id).
EDM_TEACHER_RUNTIME_FIELDS = frozenset({"preset", "compile", "preview_samples", "checkpoint_every",
                                        "keep_checkpoints", "log_every", "device", "threads"})


class EDMPickleSource(Strict):
    """Where an imported EDM teacher came from."""

    uri: str
    sha256: str = Field(min_length=64, max_length=64)
    key: str = Field("ema", description="entry of the pickled dict that held the network")
    class_name: str
    persistence_version: Optional[int] = None
    loss: Optional[dict[str, float]] = Field(None, description="the pickled loss_fn's settings, if any")
    network_source: Optional[str] = Field(
        None, description="the known EDM training/networks.py layout the pickle's embedded network source matches "
                          "('NVlabs/edm@<commit>'), 'modified' or 'unknown' (pipeline.teachers.edm_source); None: "
                          "imported before this was checked")
    source_warnings: list[str] = Field(default_factory=list,
                                       description="why the embedded network source may not be stock EDM")


TeacherModel = Annotated[Union[FlowMatchingMLPConfig, EDMNetConfig], Field(discriminator="kind")]


class TeacherManifest(Strict):
    format: Literal["kdm-teacher"] = "kdm-teacher"
    schema_version: int = SCHEMA_VERSION
    id: str = Field(description="content-addressed version of the teacher")
    version_inputs: Optional[VersionInputs] = Field(
        None, description="what the id hashes; every read recomputes it (absent in teachers from before it existed)")
    kind: Literal["flow-matching-mlp", "edm"]
    model: TeacherModel
    weights_file: str = "weights.safetensors"
    weights_sha256: str
    config_file: str = "config.json"
    data: Optional[CheckerboardSpec] = None
    dataset: Optional[DatasetRef] = None
    source: Optional[EDMPickleSource] = None
    origin: str = Field(description="how it came to be, e.g. 'trained by kdm teacher train'")
    training: Optional[Union[TeacherTrainConfig, EDMTeacherTrainConfig]] = None
    final_loss: Optional[float] = None
    code_version: str
    created: str

    @model_validator(mode="after")
    def _kind_matches_model(self) -> "TeacherManifest":
        if self.kind != self.model.kind:
            raise ValueError(f"kind {self.kind!r} does not match model.kind {self.model.kind!r}")
        if self.version_inputs is not None:
            self.version_inputs.check(self.id)
        return self
