"""Parameter counts of the image KDM presets (``kdm model-info PRESET``).

The model is built on torch's meta device: shapes only, no memory and no initialisation cost.
Counts are trainable parameters; buffers (e.g. KDM-F eigenvalue targets), the discriminator and any
frozen LPIPS network are not part of ``trainable_parameters``.
"""
from __future__ import annotations

from storage_schemas.kdm_image import IMAGE_PRESETS, KDMImageConfig


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def model_info(preset: str | KDMImageConfig) -> dict:
    """{'preset', 'trainable_parameters', 'modules': {name: count}, 'sampling_parameters',
    'discriminator_parameters'} for a preset name (or a config, reported as 'custom')."""
    if isinstance(preset, KDMImageConfig):
        name, cfg = "custom", preset
    elif preset in IMAGE_PRESETS:
        name, cfg = preset, IMAGE_PRESETS[preset]
    else:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(IMAGE_PRESETS)}")
    import torch                        # only once the preset is known: an unknown one fails fast
    from models.discriminator import Discriminator
    from models.kdm_image import KDMImage
    with torch.device("meta"):
        model = KDMImage.from_config(cfg)
        disc = Discriminator(cfg.channels)
    modules = model.parameter_counts()
    return {
        "preset": name,
        "trainable_parameters": _count(model),
        "modules": modules,
        "sampling_parameters": modules["xT_encoder"] + modules["koopman"] + modules["decoder"]
        + modules.get("control", 0),
        "discriminator_parameters": _count(disc),
    }


def format_model_info(info: dict) -> str:
    lines = [f"preset: {info['preset']}", f"trainable_parameters: {info['trainable_parameters']}"]
    lines += [f"  {name}: {count}" for name, count in info["modules"].items()]
    for key in ("sampling_parameters", "discriminator_parameters"):
        if key in info:
            lines.append(f"{key}: {info[key]}")
    return "\n".join(lines)
