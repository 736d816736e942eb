"""Sampling from a finished student run: one step, or NFE network evaluations for a multi-step student."""
from __future__ import annotations

import io
from typing import Optional, Sequence

import numpy as np
import torch
from safetensors.torch import load as st_load

from models.kdm2d import KDM2D
from models.samplers import seeded_noise
from storage_schemas import StudentManifest

from pipeline.storage import artifacts
from pipeline.devices import resolve_device
from pipeline.errors import KDMError
from pipeline.evaluation.nfe import check_nfe  # noqa: F401 (re-exported: callers import it from here too)
from pipeline.storage.manifests import read_student_manifest


def _verified_student(run: str, manifest) -> dict:
    return st_load(artifacts.read_verified(artifacts.join(run, manifest.weights_file), manifest.weights_sha256,
                                           "student"))


def load_student(run: str, device: str = "cpu") -> tuple[KDM2D, StudentManifest]:
    manifest = read_student_manifest(run)
    model = KDM2D.from_config(manifest.model, manifest.intervals)
    model.load_state_dict(_verified_student(run, manifest))
    return model.to(resolve_device(device)).eval(), manifest


def load_image_student(run: str, device: str = "cpu"):
    """EMA weights of a finished image run (``pipeline.training.image_train``'s manifest + safetensors)."""
    from models.kdm_image import KDMImage
    from pipeline.training.image_train import read_image_student_manifest
    manifest = read_image_student_manifest(run)
    model = KDMImage.from_config(manifest.model, manifest.intervals)
    model.load_state_dict(_verified_student(run, manifest))
    return model.to(resolve_device(device)).eval(), manifest


@torch.no_grad()
def generate(model: KDM2D, x_T: np.ndarray, batch: int = 65536, nfe: int = 1) -> np.ndarray:
    """Samples of ``x_T`` in ``nfe`` network evaluations (1: the one-step map)."""
    check_nfe(nfe, model.nfe_train)
    dev = next(model.parameters()).device
    outs = [model.generate(torch.from_numpy(np.ascontiguousarray(x_T[s:s + batch], np.float32)).to(dev), nfe).cpu()
            for s in range(0, len(x_T), batch)]
    return torch.cat(outs).numpy() if outs else np.zeros((0, model.dim), np.float32)


@torch.no_grad()
def generate_images(model, x_T: np.ndarray, labels: Optional[np.ndarray] = None, batch: int = 500,
                    nfe: int = 1) -> np.ndarray:
    """Samples of an image student in ``nfe`` network evaluations (float32, [-1, 1] up to the model's error),
    ``batch`` at a time."""
    check_nfe(nfe, model.nfe_train)
    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(x_T), batch):
        xb = torch.from_numpy(np.ascontiguousarray(x_T[i:i + batch], np.float32)).to(dev)
        yb = torch.from_numpy(labels[i:i + batch].astype(np.int64)).to(dev) if labels is not None else None
        out.append(model.generate(xb, yb, nfe).float().cpu().numpy())
    return np.concatenate(out)


def noise_for_seeds(seeds: Sequence[int], dim: int, scale: float = 1.0) -> np.ndarray:
    return seeded_noise(list(seeds), (dim,), scale=scale).numpy()


def load_noise(uri: str, dim: int) -> np.ndarray:
    try:
        arr = np.load(io.BytesIO(artifacts.read_bytes(uri)), allow_pickle=False)
    except FileNotFoundError:
        raise KDMError(f"noise file {uri} does not exist") from None
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise KDMError(f"noise file {uri} has shape {arr.shape}; expected (N, {dim})")
    return arr.astype(np.float32)


def sample(run: str, num: Optional[int] = None, seed: Optional[int] = None, noise: Optional[str] = None,
           device: str = "cpu", nfe: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Returns (x_0, x_T). Either ``noise`` (a .npy of x_T) or ``num`` + ``seed`` (seeds seed..seed+num-1);
    ``nfe`` network evaluations (1: the one-step map)."""
    model, manifest = load_student(run, device)
    check_nfe(nfe, manifest.nfe_trained)
    if noise is not None:
        x_T = load_noise(noise, manifest.model.dim)
    elif num is not None and seed is not None:
        x_T = noise_for_seeds(range(seed, seed + num), manifest.model.dim)
    else:
        raise KDMError("give either --noise FILE.npy or both --num N and --seed S")
    return generate(model, x_T, nfe=nfe), x_T
