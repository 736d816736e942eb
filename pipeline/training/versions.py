"""What a training run's version hashes, for the 2-D and the image student: a pure function of the pair
store's version and the config (plus the perceptual network's id for distance 'lpips-own'). Torch-free, so a
command compares the run already at ``--out`` before it loads torch."""
from __future__ import annotations

from storage_schemas import StudentRunConfig, VersionInputs, recipe_version
from storage_schemas.kdm_image import IMAGE_TRAIN_RUNTIME_FIELDS, ImageTrainConfig, KDMImageConfig


def run_version_inputs(pairs_version: str, cfg: StudentRunConfig) -> VersionInputs:
    return VersionInputs.of("kdm", recipe_version(), "train", pairs_version,
                            cfg.model_dump(mode="json", exclude={"preset": True, "train": {"device", "threads", "log_every"}}))


def run_version(pairs_version: str, cfg: StudentRunConfig) -> str:
    return run_version_inputs(pairs_version, cfg).version


def image_run_version(pairs_version: str, model_cfg: KDMImageConfig, train_cfg: ImageTrainConfig) -> str:
    """Content-addressed run version. With distance 'lpips-own' it also hashes the perceptual network's id
    and weights sha256 (read from the manifest at ``train.perceptual_net``; the location itself does not count)."""
    return image_run_version_inputs(pairs_version, model_cfg, train_cfg).version


def image_run_version_inputs(pairs_version: str, model_cfg: KDMImageConfig,
                             train_cfg: ImageTrainConfig) -> VersionInputs:
    """What ``image_run_version`` hashes."""
    parts = [recipe_version(), "train-image", pairs_version, model_cfg.model_dump(mode="json"),
             train_cfg.model_dump(mode="json", exclude=set(IMAGE_TRAIN_RUNTIME_FIELDS))]
    if model_cfg.distance == "lpips-own":
        from pipeline.training.perceptual import perceptual_net_ref
        parts.append(perceptual_net_ref(train_cfg.perceptual_net).model_dump(mode="json"))
    return VersionInputs.of("kdm-img", *parts)
