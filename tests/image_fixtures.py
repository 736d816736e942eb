"""Shared helpers of the image tests: tiny ImageFolder archives and tiny EDM configs."""
from __future__ import annotations

import contextlib
import io
import tarfile
from pathlib import Path

import numpy as np
import torch

TINY_UNET = dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)


def png_bytes(arr_hwc: np.ndarray, fmt: str = "PNG") -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(arr_hwc).save(buf, format=fmt)
    return buf.getvalue()


def random_image(rng: np.random.Generator, size: int = 8, w: int | None = None) -> np.ndarray:
    return rng.integers(0, 256, (size, w or size, 3), dtype=np.uint8)


def write_archive(path: Path, members: dict[str, bytes], dirs: bool = True) -> Path:
    """A tar.gz with the given files (and directory entries for their folders), in the dict's order."""
    with tarfile.open(path, "w:gz") as tar:
        seen = set()
        for name, data in members.items():
            if dirs:
                parts = name.split("/")[:-1]
                for k in range(1, len(parts) + 1):
                    d = "/".join(parts[:k])
                    if d not in seen:
                        seen.add(d)
                        info = tarfile.TarInfo(d)
                        info.type = tarfile.DIRTYPE
                        tar.addfile(info)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def image_folder(rng: np.random.Generator, classes=("cat", "ant", "bee"), per_class=None, size: int = 8,
                 splits=("train", "test")) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    """Members of an ImageFolder archive in a deliberately unsorted order, and the pixels by name."""
    per_class = per_class or {"train": 5, "test": 2}
    members, pixels = {}, {}
    for split in reversed(splits):
        for c in classes:                      # not sorted
            for i in reversed(range(per_class[split])):
                name = f"{split}/{c}/{i:04d}.png"
                img = random_image(rng, size)
                members[name] = png_bytes(img)
                pixels[name] = img
    return members, pixels


@contextlib.contextmanager
def single_thread():
    """torch on one intra-op thread (module-scoped fixtures run before the per-test thread fixture)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
