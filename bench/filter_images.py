#!/usr/bin/env python
"""Image privacy filter benchmark: recall on planted copies of training images, drop rate of natural images, speed.

    python bench/filter_images.py --dataset runs/cifar10 --out runs/bench-filter --per-edit 200 --natural 2000
    python bench/filter_images.py --dataset runs/cifar10 --out runs/bench-filter-gpu --device cuda --set candidates=0 \\
        --per-edit 1000 --natural 10000 --scale-to 1000000      # speed at 1M pairs (tiled store)

A pair store is built from CIFAR-10 test images (natural non-copies) and edited copies of training images, one
edit per copy: identity, shift by 1 and by 2 px, horizontal flip, JPEG quality 75, Gaussian noise sigma 0.02 (in
[0, 1] units), brightness +0.1, and combinations (flip + shift 2, flip + JPEG 75, shift 2 + noise). The product's
filter (pipeline.pairs.filter_images) runs on it with the given settings; printed and written to
``<out>/results.json``: recall per edit (copies dropped as ``memorised``), the natural images dropped (with the
reason), the calibration on the test split, and the throughput of the decision pass. ``--scale-to N`` tiles the
store to N pairs (fresh seeds and x_T; later tiles are near duplicates of the first, so it measures speed only).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from storage_schemas import ImportInfo  # noqa: E402
from storage_schemas.filter_images import ImageFilterConfig  # noqa: E402

from pipeline.data.datasets import open_image_dataset  # noqa: E402
from pipeline.pairs import filter_images as fi  # noqa: E402
from pipeline.storage import pairstore  # noqa: E402

EDITS = ("identity", "shift1", "shift2", "flip", "jpeg75", "noise0.02", "brightness0.1",
         "flip+shift2", "flip+jpeg75", "shift2+noise0.02")


def shift(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    p = max(abs(dy), abs(dx))
    h, w = img.shape[1:]
    padded = np.pad(img, ((0, 0), (p, p), (p, p)), mode="edge")
    return padded[:, p - dy:p - dy + h, p - dx:p - dx + w]


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(img.transpose(1, 2, 0)).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).transpose(2, 0, 1)


def edit(img: np.ndarray, name: str, rng: np.random.Generator) -> np.ndarray:
    """uint8 (C, H, W) -> float32 [0, 1] after the edits in ``name`` ('+'-joined, applied left to right)."""
    x = img.astype(np.float32) / 255
    for step in name.split("+"):
        if step.startswith("shift"):
            s = int(step[5:])
            dy, dx = s * int(rng.choice([-1, 1])), int(rng.integers(-s, s + 1))
            x = shift(x, *((dy, dx) if rng.random() < 0.5 else (dx, dy)))
        elif step == "flip":
            x = x[:, :, ::-1]
        elif step == "jpeg75":
            x = jpeg(np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8), 75).astype(np.float32) / 255
        elif step == "noise0.02":
            x = x + rng.normal(0, 0.02, x.shape).astype(np.float32)
        elif step == "brightness0.1":
            x = x + 0.1
        elif step != "identity":
            raise ValueError(step)
    return np.clip(x, 0, 1).astype(np.float32)


def build_store(url: str, ds_url: str, per_edit: int, natural: int, seed: int, scale_to: int,
                chunk: int) -> tuple[list[str], np.ndarray]:
    ds = open_image_dataset(ds_url)
    rng = np.random.default_rng(seed)
    train = ds.split("train").images[:]
    test = ds.split("test").images
    n_test = min(natural, test.shape[0])
    nat = test[:n_test].astype(np.float32) / 255
    src = rng.choice(train.shape[0], per_edit * len(EDITS), replace=False)
    copies, tags = [], []
    for e_i, name in enumerate(EDITS):
        for t in src[e_i * per_edit:(e_i + 1) * per_edit]:
            copies.append(edit(train[int(t)], name, rng))
            tags.append(name)
    x01 = np.concatenate([nat, np.stack(copies)])
    tags = ["natural"] * n_test + tags
    order = rng.permutation(len(x01))
    x01, tags = x01[order], [tags[i] for i in order]
    base = len(x01)
    total = max(base, scale_to)
    info = ImportInfo(format="kdm-trajectories", source_uri="bench://planted", source_sha256="0" * 64,
                      holdout_fraction=0.0, split_seed=seed)
    root = pairstore.create_arrays(url, total, x01.shape[1:], chunk)
    for a in range(0, total, chunk):
        b = min(a + chunk, total)
        idx = np.arange(a, b) % base
        x0 = x01[idx] * 2 - 1
        if a >= base:          # later tiles: a tiny offset so they are not byte-identical to the first
            x0 = x0 + 1e-3 * (a // base)
        pairstore.write_region(root, a, {"x_0": x0, "x_T": rng.standard_normal(x0.shape, dtype=np.float32),
                                         "label": np.full(b - a, -1, np.int32), "seed": np.arange(a, b)})
    pairstore.finalize(root, version=f"bench-planted-{seed}-{per_edit}-{natural}-{total}", split="train",
                       origin="import", chunk_size=chunk, import_info=info, code_version="bench", created="now")
    return tags, order


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--per-edit", type=int, default=100)
    p.add_argument("--natural", type=int, default=2000)
    p.add_argument("--scale-to", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="ImageFilterConfig field, e.g. --set rule=gu --set candidates=0")
    a = p.parse_args(argv)
    fields: dict = {"device": a.device}
    for kv in a.set:
        k, v = kv.split("=", 1)
        try:
            fields[k] = json.loads(v)
        except json.JSONDecodeError:
            fields[k] = v
    cfg = ImageFilterConfig(**fields)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    store = str(out / "planted")
    if not (out / "planted" / "zarr.json").exists():
        tags, _ = build_store(store, a.dataset, a.per_edit, a.natural, a.seed, a.scale_to, 4096)
        (out / "tags.json").write_text(json.dumps(tags))
    tags = json.loads((out / "tags.json").read_text())
    build_s = time.time() - t0
    filtered = str(out / f"filtered-{fi.image_filter_version('x', cfg, None, None)}")
    res = fi.filter_image_pairs(store, cfg, filtered, dataset_uri=a.dataset, progress=True, device=a.device)
    report = json.loads(Path(filtered, fi.REPORT_FILE).read_text())
    base = len(tags)
    reason = {d["source_index"]: d["reason"] for d in report["dropped"] if d["source_index"] < base}
    per: dict[str, dict] = {}
    for i, t in enumerate(tags):
        d = per.setdefault(t, {"n": 0, "dropped": 0, "memorised": 0})
        d["n"] += 1
        if i in reason:
            d["dropped"] += 1
            d["memorised"] += reason[i] == "memorised"
    for t, d in per.items():
        d["recall" if t != "natural" else "drop_rate"] = round(d["dropped"] / d["n"], 4)
    nat_reasons: dict[str, int] = {}
    for i, t in enumerate(tags):
        if t == "natural" and i in reason:
            nat_reasons[reason[i]] = nat_reasons.get(reason[i], 0) + 1
    results = {"config": cfg.model_dump(mode="json"), "pairs": base if not a.scale_to else max(base, a.scale_to),
               "per_tag": per, "natural_drop_reasons": nat_reasons, "calibration": res["calibration"],
               "thresholds": res["thresholds"], "counts": {k: res[k] for k in ("kept", *fi.REASONS)},
               "setup_seconds": res["setup_seconds"], "search_seconds": res["search_seconds"],
               "pairs_per_second": res["pairs_per_second"], "seconds": res["seconds"], "build_seconds": round(build_s, 1),
               "device": report["device"], "filtered": filtered, "generated_d1_quantiles": report["generated_d1_quantiles"]}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
