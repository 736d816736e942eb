"""Teacher artifacts: train a flow-matching velocity MLP on the checkerboard, save, load.

A teacher directory holds ``weights.safetensors``, ``config.json`` (the model config) and
``manifest.json`` (storage_schemas.TeacherManifest), written last. Two kinds share it: the 2-D
flow-matching MLP (``load_teacher``) and EDM preconditioned SongUNets (``build_edm_network``; written by
pipeline/teachers/bootstrap.py and pipeline/teachers/edm_pickle.py). ``load_denoiser`` gives either as a
``models.edm.Denoiser``, which is what EDM's Heun sampler needs.
"""
from __future__ import annotations

import time

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from tqdm import tqdm

from models.checkerboard import sample_checkerboard
from models.edm import PRECONDS, FlowMatchingDenoiser
from models.flow_matching import VelocityMLP, cond_ot_loss
from storage_schemas import (EDMNetConfig, TeacherManifest, TeacherTrainConfig, code_version, recipe_version,
                             VersionInputs, utc_now)

from pipeline.storage import artifacts
from pipeline.storage.manifests import read_teacher_manifest  # noqa: F401 (re-exported)
from pipeline.devices import resolve_device
from pipeline.errors import KDMError


def teacher_version_inputs(cfg: TeacherTrainConfig) -> VersionInputs:
    return VersionInputs.of("fm", recipe_version(), "teacher-train",
                            cfg.model_dump(exclude={"device", "log_every", "preset"}))


def teacher_version(cfg: TeacherTrainConfig) -> str:
    return teacher_version_inputs(cfg).version


def train_teacher(cfg: TeacherTrainConfig, out: str, progress: bool = True) -> TeacherManifest:
    """Train (or find already trained) the flow-matching teacher at ``out``."""
    version = teacher_version(cfg)
    if artifacts.check_target(out, version, read_teacher_manifest):
        return read_teacher_manifest(out)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = VelocityMLP(cfg.model.dim, cfg.model.hidden, cfg.model.layers).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    t0 = time.time()
    ema_loss = None
    bar = tqdm(range(cfg.steps), desc="teacher", disable=not progress, mininterval=1.0)
    for step in bar:
        x = sample_checkerboard(cfg.batch_size, g, cfg.data.low, cfg.data.high, cfg.data.scale).to(device)
        loss = cond_ot_loss(model, x, generator=None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        v = loss.item()
        if not torch.isfinite(torch.tensor(v)):
            raise KDMError(f"teacher training diverged at step {step} (loss {v}); lower lr={cfg.lr}")
        ema_loss = v if ema_loss is None else 0.98 * ema_loss + 0.02 * v
        if step % cfg.log_every == 0:
            bar.set_postfix(loss=f"{ema_loss:.4f}")
    weights = st_save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    tmp = artifacts.begin(out, fresh=True)
    artifacts.write_bytes(artifacts.join(tmp, "weights.safetensors"), weights)
    artifacts.write_json(artifacts.join(tmp, "config.json"), cfg.model)
    manifest = TeacherManifest(
        id=version, kind="flow-matching-mlp", model=cfg.model, weights_sha256=artifacts.sha256_bytes(weights),
        data=cfg.data, origin=f"trained by `kdm teacher train` ({cfg.steps} steps, {time.time() - t0:.0f} s)",
        training=cfg, final_loss=float(ema_loss), code_version=code_version(), created=utc_now(),
        version_inputs=teacher_version_inputs(cfg))
    artifacts.write_json(artifacts.join(tmp, artifacts.MANIFEST), manifest)
    artifacts.commit(out)
    return manifest


def _verified_weights(url: str, manifest: TeacherManifest) -> dict[str, torch.Tensor]:
    return st_load(artifacts.read_verified(artifacts.join(url, manifest.weights_file),
                                           manifest.weights_sha256, "teacher"))


def load_teacher(url: str, device: str = "cpu") -> tuple[VelocityMLP, TeacherManifest]:
    """The 2-D flow-matching velocity MLP of a ``flow-matching-mlp`` teacher."""
    manifest = read_teacher_manifest(url)
    if manifest.kind != "flow-matching-mlp":
        raise KDMError(f"{url} is a {manifest.kind} teacher, not a flow-matching velocity MLP; use load_denoiser")
    weights = _verified_weights(url, manifest)
    model = VelocityMLP(manifest.model.dim, manifest.model.hidden, manifest.model.layers)
    model.load_state_dict(weights)
    return model.to(resolve_device(device)).eval(), manifest


def edm_network_kwargs(cfg: EDMNetConfig) -> dict:
    """Constructor kwargs of the EDM preconditioner (EDM's names) described by ``cfg``."""
    unet = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.unet.model_dump().items()}
    return dict(img_resolution=cfg.img_resolution, img_channels=cfg.img_channels, label_dim=cfg.label_dim,
                use_fp16=cfg.use_fp16, model_type="SongUNet", augment_dim=cfg.augment_dim,
                **cfg.precond_kwargs, **unet)


def build_edm_network(cfg: EDMNetConfig) -> torch.nn.Module:
    """A freshly initialised EDM preconditioner + SongUNet (models/edm.py) for ``cfg``."""
    kw = edm_network_kwargs(cfg)
    if "M" in kw:
        kw["M"] = int(kw["M"])
    return PRECONDS[cfg.precond_class](**kw)


def load_denoiser(url: str, device: str = "cpu") -> tuple[torch.nn.Module, TeacherManifest]:
    """Any teacher as a ``models.edm.Denoiser`` D(x, sigma, class_labels) in eval mode.

    EDM teachers are their preconditioner; a flow-matching teacher is wrapped in FlowMatchingDenoiser.
    """
    manifest = read_teacher_manifest(url)
    if manifest.kind == "flow-matching-mlp":
        model, _ = load_teacher(url, device)
        return FlowMatchingDenoiser(model).eval(), manifest
    weights = _verified_weights(url, manifest)
    net = build_edm_network(manifest.model)
    try:
        net.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise KDMError(f"{url}: weights do not fit the config in its manifest: {e}") from None
    return net.to(resolve_device(device)).eval().requires_grad_(False), manifest
