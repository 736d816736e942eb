"""Image privacy filter and dedup: a new pair-store version holding the image pairs that survive.

The store is streamed ``cfg.chunk_size`` pairs at a time, twice (decide, then copy), never loaded whole;
reasons are applied in the order of ``REASONS`` and a pair is counted under the first one that drops
it: ``nonfinite`` (NaN/Inf in x_T or x_0), ``duplicate_seed`` (a seed seen earlier), ``exact_duplicate``
(x_0 bytes or x_T bytes equal to an earlier pair's), ``memorised`` (x_0 copies an image of the teacher's
training split), ``blocklist`` (x_0 copies a user-given image) and ``near_duplicate`` (x_0 copies an
earlier kept x_0; the first of a group is kept). The copy test is pixel-exact: RMS distance in [0, 1]
units, optionally after per-image mean / contrast normalisation, minimised over a horizontal flip and
shifts of up to ``max_shift`` pixels, and flagged by the rule of ``ImageFilterConfig`` (Carlini et al.'s
ratio to the mean of the k nearest, Gu et al.'s d1/d2, or an absolute distance calibrated on the
dataset's own test -> train nearest-neighbour distances). A cheap pooled-pixel descriptor proposes
``candidates`` neighbours per query (or ``candidates=0``: every reference image) and the exact distance
decides, so a descriptor never drops a pair by itself. All search is blocked torch matrix products, on
the GPU when the stage runs with ``device='cuda'``. The output records its source version, the kept
indices (array ``source_index``) and a count per reason (FilterRecord), a report (group attribute
``kdm_filter_report``, and ``filter_report/report.json`` with every dropped pair and its nearest match)
and a grid of the closest generated -> training matches (``filter_report/grid.png``); the held-out
split is copied unchanged.
"""
from __future__ import annotations

import hashlib
import heapq
import io
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from storage_schemas import (HELDOUT_GROUP, FilterRecord, VersionInputs, code_version, recipe_version, stable_hash,
                             store_arrays, utc_now)
from storage_schemas.filter_images import IMAGE_FILTER_REASONS, ImageFilterConfig

from pipeline.devices import resolve_device
from pipeline.errors import KDMError
from pipeline.storage import artifacts, pairstore
from pipeline.storage.pairstore import PairStore

REASONS = IMAGE_FILTER_REASONS
COPY_TEST_VERSION = "copy-test-v1"   # bumped by hand when the distance or a rule changes meaning
REPORT_KEY = "kdm_filter_report"
REPORT_GROUP = "filter_report"       # child group; its directory also holds the two files below
REPORT_FILE = "filter_report/report.json"
GRID_FILE = "filter_report/grid.png"
HIST_BINS = 40
BANK_CANDIDATES = 64     # candidates from the near-duplicate bank when cfg.candidates is 0
TIMING_KEYS = ("thresholds", "calibration", "seconds", "setup_seconds", "search_seconds", "pairs_per_second")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")

__all__ = ["ImageFilterConfig", "REASONS", "image_filter_version", "filter_image_pairs", "blocklist_digest",
           "load_blocklist", "read_filter_report", "report_markdown", "is_image_store"]


# ----------------------------------------------------------------------------- versions and inputs

def image_filter_version(source_version: str, cfg: ImageFilterConfig, dataset_content_hash: Optional[str],
                         blocklist_sha256: Optional[str]) -> str:
    return image_filter_version_inputs(source_version, cfg, dataset_content_hash, blocklist_sha256).version


def image_filter_version_inputs(source_version: str, cfg: ImageFilterConfig, dataset_content_hash: Optional[str],
                                blocklist_sha256: Optional[str]) -> VersionInputs:
    """Content-addressed id of the filtered store: source, thresholds, descriptor, dataset and blocklist.

    ``dataset_content_hash``: the dataset's content-addressed id; ``filter_image_pairs`` passes its
    ``DatasetManifest.version`` (what the flow knows before the dataset exists), None without a dataset."""
    return VersionInputs.of("filtered", recipe_version(), "filter-images", COPY_TEST_VERSION, source_version,
                            cfg.version_fields(), dataset_content_hash, blocklist_sha256)


def is_image_store(url: str) -> bool:
    """True when the pair store at ``url`` holds images ((C, H, W) samples)."""
    return len(PairStore.open(url).manifest.sample_shape) == 3


def _blocklist_files(uri: str) -> list[str]:
    fs, path = artifacts.url_to_fs(uri)
    if not fs.isdir(path):
        return []
    names = sorted(p for p in fs.ls(path, detail=False) if p.lower().endswith(IMAGE_SUFFIXES))
    if not names:
        raise KDMError(f"blocklist_uri {uri} is a folder without image files ({', '.join(IMAGE_SUFFIXES)})")
    return [artifacts.join(uri, p.rsplit("/", 1)[-1]) for p in names]


def blocklist_digest(uri: str) -> str:
    """sha256 of a blocklist file, or of the sorted (name, sha256) list of a folder's image files."""
    if not artifacts.exists(uri):
        raise KDMError(f"blocklist_uri {uri} does not exist")
    files = _blocklist_files(uri)
    if not files:
        return artifacts.sha256_file(uri)
    return artifacts.sha256_bytes("\n".join(f"{f.rsplit('/', 1)[-1]} {artifacts.sha256_file(f)}"
                                            for f in files).encode())


def _as_unit_images(arr: np.ndarray, uri: str) -> np.ndarray:
    """(N, C, H, W) float32 in [0, 1] from uint8 [0, 255] or float [-1, 1], NCHW or NHWC."""
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise KDMError(f"blocklist_uri {uri}: expected images (N, C, H, W), got an array of shape {arr.shape}")
    if arr.shape[1] not in (1, 3) and arr.shape[-1] in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise KDMError(f"blocklist_uri {uri} holds NaN/Inf values")
    return (np.clip(arr, -1, 1) + 1) / 2


def load_blocklist(uri: str, sample_shape: tuple[int, ...]) -> np.ndarray:
    """The blocklist images as float32 [0, 1] (N, C, H, W); a clear error when their size differs."""
    if not artifacts.exists(uri):
        raise KDMError(f"blocklist_uri {uri} does not exist")
    files = _blocklist_files(uri)
    if files:
        from PIL import Image
        imgs = []
        for f in files:
            with Image.open(io.BytesIO(artifacts.read_bytes(f))) as im:
                a = np.asarray(im.convert("RGB" if sample_shape[0] == 3 else "L"))
            imgs.append(a if a.ndim == 3 else a[..., None])
        shapes = {a.shape for a in imgs}
        if len(shapes) > 1:
            raise KDMError(f"blocklist_uri {uri}: images of several sizes {sorted(shapes)}; the pairs are "
                           f"{sample_shape[2]}x{sample_shape[1]}")
        arr = np.stack(imgs).transpose(0, 3, 1, 2)
    else:
        try:
            raw = np.load(io.BytesIO(artifacts.read_bytes(uri)), allow_pickle=False)
        except ValueError as e:
            raise KDMError(f"blocklist_uri {uri} is not a .npy/.npz file or image folder ({e})") from None
        if isinstance(raw, np.lib.npyio.NpzFile):
            keys = [k for k in ("images", "x_0", "arr_0") if k in raw.files] or list(raw.files)
            if not keys:
                raise KDMError(f"blocklist_uri {uri} is an empty .npz")
            arr = raw[keys[0]]
        else:
            arr = raw
    out = _as_unit_images(arr, uri)
    if tuple(out.shape[1:]) != tuple(sample_shape):
        raise KDMError(f"blocklist_uri {uri} has images of shape {tuple(out.shape[1:])} (C, H, W), the pairs "
                       f"have {tuple(sample_shape)}; resize the blocklist to the pairs' resolution")
    return out


# ----------------------------------------------------------------------------- the copy test

def _normalise(x: torch.Tensor, how: str) -> torch.Tensor:
    """Per-image normalisation of (N, C, H, W) [0, 1] images."""
    if how == "none":
        return x
    x = x - x.mean(dim=(1, 2, 3), keepdim=True)
    if how == "mean-std":
        x = x / x.flatten(1).std(dim=1).clamp_min(1e-3)[:, None, None, None] * 0.25
    return x


def _normalise_rows(v: torch.Tensor, how: str) -> torch.Tensor:
    """The same normalisation of each compared window (..., D): its own mean (and contrast), so a brightness
    or contrast change and the border a shift brings in do not count as differences."""
    if how == "none":
        return v
    v = v - v.mean(-1, keepdim=True)
    if how == "mean-std":
        v = v / v.std(-1, keepdim=True).clamp_min(1e-3) * 0.25
    return v


def _descriptor(x: torch.Tensor, version: str) -> torch.Tensor:
    """Overlapping average pooling (windows of 2 cells) to an 8x8 grid, flattened (both descriptor versions)."""
    h = x.shape[-1]
    cell = max(1, h // 8)
    if h % 8 == 0 and cell >= 2:
        d = F.avg_pool2d(x, kernel_size=2 * cell, stride=cell, padding=cell // 2, count_include_pad=False)
    else:
        d = F.adaptive_avg_pool2d(x, (min(8, x.shape[-2]), min(8, h)))
    return d.flatten(1)


def _probes(version: str, max_shift: int) -> list[tuple[int, int]]:
    """Query shifts whose descriptors are searched: pool8-v1 the image as is; pool8-p4-v1 the four diagonal
    moves by max_shift // 2 pixels (so a shift of up to max_shift is at most max_shift // 2 + 1 from a probe)."""
    p = max_shift // 2
    if version == "pool8-v1" or p == 0:
        return [(0, 0)]
    return [(p, p), (p, -p), (-p, p), (-p, -p)]


def _shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    if dy == 0 and dx == 0:
        return x
    p = max(abs(dy), abs(dx))
    h, w = x.shape[-2:]
    xp = F.pad(x, (p, p, p, p), mode="replicate")
    return xp[:, :, p + dy:p + dy + h, p + dx:p + dx + w]


def _crop(x: torch.Tensor, s: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    return x[:, :, s:h - s, s:w - s].flatten(1)


def _variants(x: torch.Tensor, s: int, flip: bool) -> torch.Tensor:
    """(N, V, D): every window of the query aligned with a reference's central crop."""
    h, w = x.shape[-2:]
    srcs = [x, x.flip(-1)] if flip else [x]
    out = [img[:, :, s + dy:h - s + dy, s + dx:w - s + dx].flatten(1)
           for img in srcs for dy in range(-s, s + 1) for dx in range(-s, s + 1)]
    return torch.stack(out, 1)


def _variant_meta(s: int, flip: bool) -> list[tuple[int, int, bool]]:
    return [(dy, dx, f) for f in ([False, True] if flip else [False])
            for dy in range(-s, s + 1) for dx in range(-s, s + 1)]


class RefSet:
    """Reference images (training split, blocklist or kept pairs) as normalised central crops plus
    descriptors, on the search device; images can be appended (the near-duplicate bank)."""

    def __init__(self, cfg: ImageFilterConfig, dev: torch.device):
        self.cfg, self.dev = cfg, dev
        self.store = torch.float16 if dev.type == "cuda" else torch.float32
        self._crops: list[torch.Tensor] = []
        self._desc: list[torch.Tensor] = []
        self._ids: list[np.ndarray] = []
        self._cat = None

    def add(self, prepared: tuple[torch.Tensor, torch.Tensor], ids: np.ndarray) -> None:
        crops, desc = prepared
        if len(ids):
            self._crops.append(crops.to(self.store))
            self._desc.append(desc)
            self._ids.append(np.asarray(ids, np.int64))
            self._cat = None

    def arrays(self):
        if self._cat is None:
            if self._crops:
                crops = torch.cat(self._crops)
                self._crops = [crops]
                desc = torch.cat(self._desc)
                self._desc = [desc]
                ids = np.concatenate(self._ids)
                self._ids = [ids]
            else:
                d = 0
                crops = torch.zeros((0, d), device=self.dev, dtype=self.store)
                desc = torch.zeros((0, d), device=self.dev)
                ids = np.zeros(0, np.int64)
            self._cat = (crops, desc, ids, crops.float().square().sum(1) if len(ids) else None)
        return self._cat

    def __len__(self) -> int:
        return sum(len(i) for i in self._ids)


@dataclass
class Matches:
    """The k nearest references of each query: distances (ascending), reference ids, and the shift/flip of
    the nearest."""

    dist: np.ndarray      # (n, k) float64, inf where fewer references exist
    ref: np.ndarray       # (n, k) int64 reference ids, -1 where none
    variant: np.ndarray   # (n,) index into _variant_meta of the nearest


class Searcher:
    def __init__(self, cfg: ImageFilterConfig, dev: torch.device):
        self.cfg, self.dev = cfg, dev
        self.s = cfg.max_shift
        self.qblock = 256 if dev.type == "cuda" else 64
        self.rblock = 8192 if dev.type == "cuda" else 2048

    def prepare(self, x01: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images -> (central crops, descriptors) of references."""
        x = self._tensor(x01)
        return (_normalise_rows(_crop(x, self.s), self.cfg.normalise),
                _descriptor(_normalise(x, self.cfg.normalise), self.cfg.descriptor))

    def _tensor(self, x01) -> torch.Tensor:
        return torch.as_tensor(x01, dtype=torch.float32).to(self.dev)

    def check_shape(self, shape: tuple[int, ...], what: str) -> None:
        if len(shape) != 3 or min(shape[1:]) <= 2 * self.s:
            raise KDMError(f"{what} of shape {shape} is too small for max_shift={self.s} (needs (C, H, W) with H "
                           f"and W > {2 * self.s})")

    def search(self, x01: np.ndarray, refs: RefSet, k: int, limit: Optional[np.ndarray] = None) -> Matches:
        """The k nearest references of each query image (float [0, 1], (n, C, H, W)) under the copy distance.

        ``limit[i]``: only references at positions < limit[i] count for query i (the near-duplicate bank, which
        is always searched through candidates: ``cfg.candidates``, or 64 when that is 0, since an exhaustive
        search of a growing bank is quadratic in the store size)."""
        crops, desc, ids, rsq = refs.arrays()
        n, m = len(x01), len(ids)
        out_d = np.full((n, k), np.inf)
        out_r = np.full((n, k), -1, np.int64)
        out_v = np.zeros(n, np.int64)
        if n == 0 or m == 0:
            return Matches(out_d, out_r, out_v)
        D = crops.shape[1]
        for a in range(0, n, self.qblock):
            q = self._tensor(x01[a:a + self.qblock])
            b = len(q)
            lim = None if limit is None else torch.as_tensor(limit[a:a + b], device=self.dev)
            qv = _normalise_rows(_variants(q, self.s, self.cfg.flip), self.cfg.normalise)   # (b, V, D)
            qsq = qv.square().sum(-1)                                    # (b, V)
            K = self.cfg.candidates or (BANK_CANDIDATES if limit is not None else 0)
            if K == 0 or K >= m:
                d2, vi, ri = self._exhaustive(qv, qsq, crops, rsq, k, lim)
            else:
                d2, vi, ri = self._candidates(_normalise(q, self.cfg.normalise), qv, qsq, crops, desc, k, lim, K)
            kk = d2.shape[1]
            dist = (d2.clamp_min(0) / D).sqrt().double().cpu().numpy()
            ri_np = ri.cpu().numpy()
            valid = np.isfinite(dist)
            out_d[a:a + b, :kk] = dist
            out_r[a:a + b, :kk] = np.where(valid, ids[np.clip(ri_np, 0, m - 1)], -1)
            out_v[a:a + b] = vi.cpu().numpy()
        return Matches(out_d, out_r, out_v)

    def _exhaustive(self, qv, qsq, crops, rsq, k, lim):
        b, V, _ = qv.shape
        best_d = torch.full((b, 0), float("inf"), device=self.dev)
        best_i = torch.zeros((b, 0), dtype=torch.long, device=self.dev)
        best_v = torch.zeros((b, 0), dtype=torch.long, device=self.dev)
        flat = qv.reshape(b * V, -1)
        for s0 in range(0, len(crops), self.rblock):
            r = crops[s0:s0 + self.rblock].float()
            d2 = torch.addmm(qsq.reshape(-1, 1), flat, r.T, alpha=-2).view(b, V, len(r))
            d2, v = d2.min(1)                                            # (b, m_blk)
            d2 += rsq[s0:s0 + len(r)][None, :]
            idx = torch.arange(s0, s0 + len(r), device=self.dev)
            if lim is not None:
                d2 = d2.masked_fill(idx[None, :] >= lim[:, None], float("inf"))
            cd = torch.cat([best_d, d2], 1)
            ci = torch.cat([best_i, idx.expand(b, -1)], 1)
            cv = torch.cat([best_v, v], 1)
            kk = min(k, cd.shape[1])
            best_d, o = cd.topk(kk, dim=1, largest=False)
            best_i, best_v = ci.gather(1, o), cv.gather(1, o)
        return best_d, best_v[:, 0], best_i

    def _candidates(self, q, qv, qsq, crops, desc, k, lim, K):
        b, V, _ = qv.shape
        K = min(K, len(crops))
        views = [q, q.flip(-1)] if self.cfg.flip else [q]
        qd = torch.stack([_descriptor(_shifted(v, dy, dx), self.cfg.descriptor) for v in views
                          for dy, dx in _probes(self.cfg.descriptor, self.s)], 1)   # (b, probes, d)
        dsq = desc.square().sum(1)
        P = qd.shape[1]
        qflat = qd.reshape(b * P, -1)
        qn = qflat.square().sum(1, keepdim=True)
        best_d = torch.full((b, 0), float("inf"), device=self.dev)
        best_i = torch.zeros((b, 0), dtype=torch.long, device=self.dev)
        for s0 in range(0, len(desc), self.rblock * 4):
            r = desc[s0:s0 + self.rblock * 4]
            d2 = torch.addmm(qn, qflat, r.T, alpha=-2).view(b, P, len(r)).amin(1)
            d2 += dsq[s0:s0 + len(r)][None, :]                           # (b, m_blk)
            idx = torch.arange(s0, s0 + len(r), device=self.dev)
            if lim is not None:
                d2 = d2.masked_fill(idx[None, :] >= lim[:, None], float("inf"))
            cd = torch.cat([best_d, d2], 1)
            ci = torch.cat([best_i, idx.expand(b, -1)], 1)
            best_d, o = cd.topk(min(K, cd.shape[1]), dim=1, largest=False)
            best_i = ci.gather(1, o)
        cand = best_i                                                    # (b, K)
        rc = crops[cand].float()                                         # (b, K, D)
        d2, v = torch.baddbmm(qsq[:, :, None], qv, rc.transpose(1, 2), alpha=-2).min(1)   # (b, K)
        d2 += rc.square().sum(-1)
        d2 = d2.masked_fill(~torch.isfinite(best_d), float("inf"))       # masked-out candidates stay out
        kk = min(k, K)
        d2s, o = d2.topk(kk, dim=1, largest=False)
        return d2s, v.gather(1, o)[:, 0], cand.gather(1, o)


# ----------------------------------------------------------------------------- flag rules

@dataclass
class Neighbourhood:
    """Per-query training statistics: nearest distance d1, d2, mean of the k nearest, and the ratio."""

    d1: np.ndarray
    d2: np.ndarray
    meank: np.ndarray
    ref: np.ndarray
    variant: np.ndarray

    @classmethod
    def of(cls, m: Matches, k: int) -> "Neighbourhood":
        d = m.dist
        finite = np.isfinite(d[:, :k])
        with np.errstate(invalid="ignore"):
            meank = np.where(finite, d[:, :k], 0).sum(1) / np.maximum(finite.sum(1), 1)
        d2 = d[:, 1] if d.shape[1] > 1 else np.full(len(d), np.inf)
        return cls(d[:, 0], d2, meank, m.ref[:, 0], m.variant)

    def ratio(self, rule: str) -> np.ndarray:
        scale = self.d2 if rule == "gu" else self.meank
        with np.errstate(divide="ignore", invalid="ignore"):
            r = self.d1 / scale
        r = np.where(np.isfinite(scale), np.nan_to_num(r, nan=np.inf, posinf=np.inf), 1.0)   # no 2nd neighbour
        return np.where(self.d1 <= 0, 0.0, r)

    def scale(self, rule: str) -> np.ndarray:
        """The distance below which another image counts as a copy (blocklist, near-duplicates)."""
        return self.d1 if rule == "gu" else self.meank


class Rule:
    def __init__(self, cfg: ImageFilterConfig, absolute: Optional[float]):
        self.cfg, self.absolute = cfg, absolute

    def memorised(self, nb: Neighbourhood) -> np.ndarray:
        if self.cfg.rule == "absolute":
            return nb.d1 < self.absolute
        return nb.ratio(self.cfg.rule) < self.cfg.ratio_threshold

    def copy_radius(self, nb: Optional[Neighbourhood], n: int) -> np.ndarray:
        if self.cfg.rule == "absolute":
            return np.full(n, self.absolute)
        return self.cfg.ratio_threshold * nb.scale(self.cfg.rule)


# ----------------------------------------------------------------------------- the stage

def _k(cfg: ImageFilterConfig) -> int:
    return max(cfg.neighbours if cfg.rule == "carlini" else 2, 2)


def _unit(x0: np.ndarray) -> np.ndarray:
    return (np.clip(x0.astype(np.float32), -1, 1) + 1) / 2


def _quantiles(v: np.ndarray) -> dict[str, float]:
    v = v[np.isfinite(v)]
    if not len(v):
        return {}
    return {str(q): round(float(np.quantile(v, q)), 6) for q in (0.001, 0.01, 0.03, 0.05, 0.5)}


@dataclass
class _Grid:
    size: int
    heap: list = field(default_factory=list)   # (-d1, counter, entry dict, uint8 image)
    count: int = 0

    def wants(self, d1: float) -> bool:
        return self.size > 0 and np.isfinite(d1) and (len(self.heap) < self.size or -d1 > self.heap[0][0])

    def offer(self, d1: float, entry: dict, img01: np.ndarray) -> None:
        if self.size == 0 or not np.isfinite(d1):
            return
        self.count += 1
        item = (-d1, self.count, entry, (img01 * 255 + 0.5).astype(np.uint8))
        if len(self.heap) < self.size:
            heapq.heappush(self.heap, item)
        elif -d1 > self.heap[0][0]:
            heapq.heapreplace(self.heap, item)

    def ordered(self) -> list:
        return sorted(self.heap, key=lambda t: (-t[0], t[1]))


def _grid_png(rows: list, train: np.ndarray) -> bytes:
    """Pairs of (generated, nearest training image), 8 pairs per row, 1-px separators."""
    from PIL import Image
    c, h, w = rows[0][3].shape
    per_row = 8
    nrow = (len(rows) + per_row - 1) // per_row
    canvas = np.full((nrow * (h + 2), per_row * (2 * w + 3), 3), 255, np.uint8)
    for i, (_, _, entry, img) in enumerate(rows):
        y, x = (i // per_row) * (h + 2), (i % per_row) * (2 * w + 3)
        t = train[entry["train_index"]]
        for j, im in enumerate((img, t)):
            im = np.repeat(im, 3, 0) if c == 1 else im
            canvas[y:y + h, x + j * w:x + (j + 1) * w] = im.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return buf.getvalue()


def read_filter_report(url: str) -> dict:
    """The summary report a filtered image store carries (group attribute ``kdm_filter_report``)."""
    return dict(PairStore.open(url).group.attrs.get(REPORT_KEY) or {})


def report_markdown(report: dict) -> str:
    """The report as Markdown (a Prefect artifact): counts, thresholds, calibration and histograms."""
    lines = ["| reason | pairs |", "|---|---|"] + [f"| {r} | {report['counts'][r]} |" for r in report["counts"]]
    lines += ["", "thresholds: " + ", ".join(f"{k}={v}" for k, v in report["thresholds"].items())]
    cal = report.get("calibration") or {}
    if cal:
        lines += ["", "calibration: " + ", ".join(f"{k}={v}" for k, v in cal.items() if not isinstance(v, dict))]
    hist = report.get("histogram")
    if hist:
        lines += ["", "| nearest-training distance from | generated | test |", "|---|---|---|"]
        e = hist["edges"]
        for i, (g, t) in enumerate(zip(hist["generated"], hist["test"])):
            if g or t:
                lines.append(f"| {e[i]:.4f}-{e[i + 1]:.4f} | {g} | {t} |")
    return "\n".join(lines)


def _rows(group, names, a: int, b: int) -> dict[str, np.ndarray]:
    return {n: group[n][a:b] for n in names}


T = TypeVar("T")


def _ahead(starts: range, read: Callable[[int], T]) -> Iterator[tuple[int, T]]:
    """(a, read(a)) for each a of ``starts``, the next read running in a thread while the caller works on this
    one: chunk decoding and checking (numcodecs and hashlib release the GIL) overlap the search."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        it = iter(starts)
        a = next(it, None)
        pending = pool.submit(read, a) if a is not None else None
        while pending is not None:
            data = pending.result()
            nxt = next(it, None)
            following = pool.submit(read, nxt) if nxt is not None else None
            yield a, data
            a, pending = nxt, following


def _row_digest(arr: np.ndarray) -> list[bytes]:
    flat = np.ascontiguousarray(arr).reshape(len(arr), -1)
    return [hashlib.blake2b(r.tobytes(), digest_size=16).digest() for r in flat]


def filter_image_pairs(pairs_uri: str, cfg: ImageFilterConfig, out: str, dataset_uri: Optional[str] = None,
                       progress: bool = False, device: str = "cpu") -> dict:
    """Filter the image pair store at ``pairs_uri`` into a new version at ``out`` (no-op when committed).

    ``dataset_uri``: the teacher's prepared dataset (``kdm dataset prepare``); needed for ``memorised``,
    for the ratio rules' scale and for calibration. ``device``: 'cuda' (or ``cfg.device='cuda'``) runs the
    search on the GPU. Returns the counts per reason (``kept`` first, then REASONS in order) plus
    ``version``, ``thresholds``, ``calibration``, ``seconds`` (all), ``setup_seconds`` (training references and
    calibration), ``search_seconds`` and ``pairs_per_second`` (the decision pass over the store) and ``report_uri``.
    """
    t0 = time.time()
    dev = resolve_device(device if device != "cpu" else cfg.device)
    source = PairStore.open(pairs_uri)
    m = source.manifest
    shape = tuple(m.sample_shape)
    if len(shape) != 3:
        raise KDMError(f"{pairs_uri} holds samples of shape {shape}, not images (C, H, W); use the 2-D filter "
                       f"(kdm pairs filter without --dataset)")
    searcher = Searcher(cfg, dev)
    searcher.check_shape(shape, f"the pairs at {pairs_uri}")
    ds = None
    if dataset_uri is not None:
        from pipeline.data.datasets import open_image_dataset
        ds = open_image_dataset(dataset_uri)
        if tuple(ds.manifest.image_shape) != shape:
            raise KDMError(f"dataset {dataset_uri} has images of shape {tuple(ds.manifest.image_shape)} (C, H, W), "
                           f"the pairs at {pairs_uri} have {shape}; give the dataset the teacher was trained on")
        if "train" not in ds.manifest.splits:
            raise KDMError(f"dataset {dataset_uri} has no 'train' split to test memorisation against")
    elif cfg.rule != "absolute" and (cfg.memorisation or cfg.near_duplicates or cfg.blocklist_uri):
        raise KDMError(f"the image filter's rule '{cfg.rule}' needs the teacher's dataset (--dataset / dataset_uri) "
                       f"for its scale; or use rule='absolute' with absolute_threshold")
    if ds is None and cfg.rule == "absolute" and cfg.absolute_threshold is None:
        raise KDMError("rule 'absolute' without a dataset needs absolute_threshold (nothing to calibrate on)")
    block_sha = blocklist_digest(cfg.blocklist_uri) if cfg.blocklist_uri else None
    version = image_filter_version(m.version, cfg, ds.manifest.version if ds else None, block_sha)
    if artifacts.check_target(out, version, pairstore.read_store_manifest):
        report = read_filter_report(out)
        saved = dict(PairStore.open(out).manifest.filter.counts)
        return {**{r: saved[r] for r in ("kept", *REASONS)}, "version": version,
                **{k: report.get(k) for k in TIMING_KEYS},
                "report_uri": artifacts.join(out, REPORT_FILE), "noop": True}
    blocklist = load_blocklist(cfg.blocklist_uri, shape) if cfg.blocklist_uri else None

    k = _k(cfg)
    train_u8 = None
    train_refs = None
    if ds is not None:
        train_u8, _ = ds.load("train")
        train_refs = RefSet(cfg, dev)
        step = 8192
        for a in range(0, len(train_u8), step):
            train_refs.add(searcher.prepare(train_u8[a:a + step].astype(np.float32) / 255.0),
                           np.arange(a, min(a + step, len(train_u8))))

    # calibration: the dataset's own test -> train nearest distances
    calibration: dict = {}
    test_d1 = np.zeros(0)
    absolute = cfg.absolute_threshold
    if ds is not None and "test" in ds.manifest.splits and cfg.calibration_samples > 0:
        test = ds.split("test")
        nt = len(test)
        take = np.unique(np.linspace(0, nt - 1, min(cfg.calibration_samples, nt)).round().astype(np.int64))
        nbs = []
        for a in range(0, len(take), cfg.chunk_size):
            sel = take[a:a + cfg.chunk_size]
            imgs = test.images[int(sel[0]):int(sel[-1]) + 1][sel - sel[0]].astype(np.float32) / 255.0
            nbs.append(Neighbourhood.of(searcher.search(imgs, train_refs, k), k))
        tnb = Neighbourhood(*(np.concatenate([getattr(x, f) for x in nbs])
                              for f in ("d1", "d2", "meank", "ref", "variant")))
        test_d1 = tnb.d1
        if absolute is None and cfg.rule == "absolute":
            absolute = float(np.quantile(test_d1, cfg.absolute_quantile))
            if absolute <= 0:
                absolute = float(np.min(test_d1[test_d1 > 0])) if (test_d1 > 0).any() else 1e-6
        rule = Rule(cfg, absolute)
        flagged = rule.memorised(tnb)
        calibration = {"test_images": int(len(take)), "test_flagged": int(flagged.sum()),
                       "test_flag_rate": round(float(flagged.mean()), 6),
                       "test_d1_quantiles": _quantiles(test_d1),
                       "test_ratio_median": round(float(np.median(tnb.ratio(cfg.rule if cfg.rule != "absolute"
                                                                           else "carlini"))), 6)}
    elif cfg.rule == "absolute" and absolute is None:
        raise KDMError(f"rule 'absolute' needs absolute_threshold or a dataset with a 'test' split and "
                       f"calibration_samples > 0 (dataset {dataset_uri})")
    rule = Rule(cfg, absolute)
    t_setup = time.time() - t0

    block_refs = None
    if blocklist is not None:
        block_refs = RefSet(cfg, dev)
        block_refs.add(searcher.prepare(blocklist), np.arange(len(blocklist)))
    bank = RefSet(cfg, dev)

    n = len(source)
    keep = np.ones(n, bool)
    counts = {r: 0 for r in REASONS}
    gen_d1 = np.full(n, np.nan, np.float32)
    dropped: list[dict] = []
    grid = _Grid(cfg.grid_size if train_refs is not None else 0)
    seen_seeds: set[int] = set()
    seen_x0: set[bytes] = set()
    seen_xT: set[bytes] = set()
    meta = _variant_meta(cfg.max_shift, cfg.flip)
    from tqdm import tqdm
    bar = tqdm(total=n, desc="filter", unit="pair", disable=not progress, mininterval=1.0)

    def drop(rows: np.ndarray, reason: str, info: Optional[dict] = None) -> None:
        for i in rows:
            keep[i] = False
            counts[reason] += 1
            entry = {"source_index": int(i), "seed": int(seeds_all[i - a]), "reason": reason}
            if info is not None:
                entry.update(info[int(i)])
            dropped.append(entry)

    for a, chunk in _ahead(range(0, n, cfg.chunk_size),
                           lambda a: _rows(source.checked, ("x_T", "x_0", "seed"), a, min(a + cfg.chunk_size, n))):
        seeds_all = chunk["seed"]
        rows = np.arange(a, a + len(seeds_all))
        alive = np.ones(len(rows), bool)
        if cfg.drop_nonfinite:
            fin = (np.isfinite(chunk["x_0"].reshape(len(rows), -1)).all(1)
                   & np.isfinite(chunk["x_T"].reshape(len(rows), -1)).all(1))
            drop(rows[~fin], "nonfinite")
            alive &= fin
        if cfg.dedup_seeds:
            dup = np.zeros(len(rows), bool)
            for j in np.flatnonzero(alive):
                s = int(seeds_all[j])
                if s in seen_seeds:
                    dup[j] = True
                else:
                    seen_seeds.add(s)
            drop(rows[dup], "duplicate_seed")
            alive &= ~dup
        if cfg.exact_duplicates:
            dup = np.zeros(len(rows), bool)
            idx = np.flatnonzero(alive)
            for j, h0, hT in zip(idx, _row_digest(chunk["x_0"][idx]), _row_digest(chunk["x_T"][idx])):
                if h0 in seen_x0 or hT in seen_xT:
                    dup[j] = True
                else:
                    seen_x0.add(h0)
                    seen_xT.add(hT)
            drop(rows[dup], "exact_duplicate")
            alive &= ~dup
        idx = np.flatnonzero(alive)
        x01 = _unit(chunk["x_0"][idx]) if len(idx) else np.zeros((0, *shape), np.float32)
        nb = None
        if train_refs is not None and len(idx):
            nb = Neighbourhood.of(searcher.search(x01, train_refs, k), k)
            gen_d1[rows[idx]] = nb.d1
            ratio = nb.ratio(cfg.rule if cfg.rule != "absolute" else "carlini")
            for j in range(len(idx)):
                if not grid.wants(float(nb.d1[j])):
                    continue
                dy, dx, fl = meta[nb.variant[j]]
                grid.offer(float(nb.d1[j]), {"source_index": int(rows[idx[j]]), "seed": int(seeds_all[idx[j]]),
                                             "train_index": int(nb.ref[j]), "distance": round(float(nb.d1[j]), 6),
                                             "ratio": round(float(ratio[j]), 6), "shift": [dy, dx], "flip": fl},
                           x01[j])
            if cfg.memorisation:
                mem = rule.memorised(nb)
                info = {int(rows[idx[j]]): {"nearest": "train", "nearest_index": int(nb.ref[j]),
                                            "distance": round(float(nb.d1[j]), 6), "ratio": round(float(ratio[j]), 6),
                                            "shift": list(meta[nb.variant[j]][:2]), "flip": meta[nb.variant[j]][2]}
                        for j in np.flatnonzero(mem)}
                drop(rows[idx[mem]], "memorised", info)
                sub = ~mem
                idx, x01 = idx[sub], x01[sub]
                nb = Neighbourhood(nb.d1[sub], nb.d2[sub], nb.meank[sub], nb.ref[sub], nb.variant[sub])
        if block_refs is not None and len(idx):
            bm = searcher.search(x01, block_refs, 1)
            hit = bm.dist[:, 0] < rule.copy_radius(nb, len(idx))
            info = {int(rows[idx[j]]): {"nearest": "blocklist", "nearest_index": int(bm.ref[j, 0]),
                                        "distance": round(float(bm.dist[j, 0]), 6),
                                        "shift": list(meta[bm.variant[j]][:2]), "flip": meta[bm.variant[j]][2]}
                    for j in np.flatnonzero(hit)}
            drop(rows[idx[hit]], "blocklist", info)
            idx, x01 = idx[~hit], x01[~hit]
            if nb is not None:
                nb = Neighbourhood(nb.d1[~hit], nb.d2[~hit], nb.meank[~hit], nb.ref[~hit], nb.variant[~hit])
        if cfg.near_duplicates and len(idx):
            m0 = len(bank)
            bank.add(searcher.prepare(x01), rows[idx])          # candidates: the bank and this chunk's earlier rows
            limit = m0 + np.arange(len(idx))
            nm = searcher.search(x01, bank, k, limit=limit)
            radius = rule.copy_radius(nb, len(idx))
            kept_local = np.ones(len(idx), bool)
            pos = {int(r): p for p, r in enumerate(rows[idx])}
            near = np.zeros(len(idx), bool)
            info = {}
            for p in range(len(idx)):
                for d, r in zip(nm.dist[p], nm.ref[p]):
                    if not d < radius[p]:
                        break
                    q = pos.get(int(r))
                    if q is None or kept_local[q]:                # an earlier chunk's pair is always kept
                        near[p], kept_local[p] = True, False
                        dy, dx, fl = meta[nm.variant[p]]
                        info[int(rows[idx[p]])] = {"nearest": "pair", "nearest_index": int(r),
                                                   "distance": round(float(d), 6), "shift": [dy, dx], "flip": fl}
                        break
            drop(rows[idx[near]], "near_duplicate", info)
            _bank_keep(bank, m0, ~near)
        bar.update(len(rows))
    bar.close()
    t_pass = time.time() - t0 - t_setup

    counts = {"kept": int(keep.sum()), **counts}
    kept = np.flatnonzero(keep)
    seconds = time.time() - t0
    thresholds = {"rule": cfg.rule, "ratio_threshold": cfg.ratio_threshold, "neighbours": cfg.neighbours,
                  "absolute_threshold": absolute, "max_shift": cfg.max_shift, "flip": cfg.flip,
                  "normalise": cfg.normalise, "descriptor": cfg.descriptor, "candidates": cfg.candidates}
    gd = gen_d1[np.isfinite(gen_d1)]
    hist = None
    if len(gd) or len(test_d1):
        top = float(max(np.max(gd) if len(gd) else 0, np.max(test_d1) if len(test_d1) else 0, 1e-6))
        edges = np.linspace(0, top, HIST_BINS + 1)
        hist = {"edges": [round(float(e), 6) for e in edges],
                "generated": np.histogram(gd, edges)[0].tolist(), "test": np.histogram(test_d1, edges)[0].tolist()}
    grid_rows = grid.ordered()
    report = {"version": version, "source_version": m.version, "counts": counts, "thresholds": thresholds,
              "calibration": calibration, "generated_d1_quantiles": _quantiles(gd), "histogram": hist,
              "seconds": round(seconds, 3), "setup_seconds": round(t_setup, 3), "search_seconds": round(t_pass, 3),
              "pairs_per_second": round(n / max(t_pass, 1e-9), 1),
              "device": str(dev), "dataset": dataset_uri, "blocklist_sha256": block_sha,
              "memorisation_tested": bool(cfg.memorisation and train_refs is not None),
              "grid": [r[2] for r in grid_rows]}

    record = FilterRecord(source_version=m.version, source_content_hash=m.content_hash,
                          config_hash=stable_hash(cfg.version_fields(), block_sha,
                                                  ds.manifest.content_hash if ds else None), counts=counts)
    tmp = artifacts.begin(out, fresh=True)
    root = pairstore.create_arrays(tmp, len(kept), shape, m.chunk_size, extra=("source_index",),
                                   snapshots=m.snapshots.count if m.snapshots else 0)
    _copy_rows(source.checked, root, kept, m.chunk_size, cfg.chunk_size)
    held = source.heldout()
    if held is not None:
        hm = held.manifest
        child = pairstore.create_arrays(artifacts.join(tmp, HELDOUT_GROUP), len(held), hm.sample_shape,
                                        hm.chunk_size, snapshots=hm.snapshots.count if hm.snapshots else 0)
        _copy_rows(held.checked, child, np.arange(len(held)), hm.chunk_size, cfg.chunk_size, index=False)
        pairstore.finalize(child, **(hm.model_dump(exclude={"content_hash", "arrays", "count", "sample_shape",
                                                            "code_version", "created"})
                                     | {"code_version": code_version(), "created": utc_now()}))
    rg = root.create_group(REPORT_GROUP)
    rg.attrs.update({"description": "image filter report: report.json (counts, thresholds, calibration, "
                                    "histogram, grid entries, every dropped pair with its nearest match) and "
                                    "grid.png (closest generated | training pairs, 8 per row, grid order)"})
    artifacts.write_json(artifacts.join(tmp, REPORT_FILE), {**report, "dropped": dropped})
    if grid_rows:
        artifacts.write_bytes(artifacts.join(tmp, GRID_FILE), _grid_png(grid_rows, train_u8))
    root.attrs[REPORT_KEY] = report
    inherited = m.model_dump(include={"seeds", "teacher", "sampler", "x_T_scale", "num_classes", "import_info",
                                      "snapshots"})
    pairstore.finalize(root, version=version, split="train", origin="filter", chunk_size=m.chunk_size,
                       filter=record, code_version=code_version(), created=utc_now(),
                       version_inputs=image_filter_version_inputs(m.version, cfg, ds.manifest.version if ds else None,
                                                                  block_sha), **inherited)
    artifacts.commit(out)
    return {**counts, "version": version, "thresholds": thresholds, "calibration": calibration,
            **{k: report[k] for k in TIMING_KEYS},
            "report_uri": artifacts.join(out, REPORT_FILE), "noop": False}


def _bank_keep(bank: RefSet, m0: int, keep_new: np.ndarray) -> None:
    """Drop the near-duplicates just appended to the bank (positions >= m0) so it holds kept pairs only."""
    crops, desc, ids, _ = bank.arrays()
    sel = torch.as_tensor(np.concatenate([np.ones(m0, bool), keep_new]), device=crops.device)
    bank._crops, bank._desc, bank._ids = [crops[sel]], [desc[sel]], [ids[sel.cpu().numpy()]]
    bank._cat = None


def _copy_rows(src, dst, rows: np.ndarray, out_chunk: int, read_chunk: int, index: bool = True) -> None:
    """Copy ``rows`` of ``src`` (ascending) to ``dst`` in whole output chunks, reading ``read_chunk`` at a time
    (the pairs' arrays, trajectory snapshots included)."""
    names = tuple(k for k in store_arrays(True) if k in src)
    buf: dict[str, list[np.ndarray]] = {k: [] for k in (*names, "source_index")}
    held, pos = 0, 0

    def flush(final: bool) -> None:
        nonlocal held, pos
        if not held:
            return
        data = {k: np.concatenate(v) for k, v in buf.items() if v}
        take = held if final else (held // out_chunk) * out_chunk
        if take == 0:
            return
        pairstore.write_region(dst, pos, {k: v[:take] for k, v in data.items()})
        for k in buf:
            buf[k] = [data[k][take:]] if k in data and take < held else []
        pos += take
        held -= take

    n = int(src["x_0"].shape[0])
    def sel_of(a: int) -> np.ndarray:          # rows is ascending
        return rows[np.searchsorted(rows, a):np.searchsorted(rows, a + read_chunk)]

    def read(a: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        sel = sel_of(a)
        return sel, {k: src[k][a:min(a + read_chunk, n)][sel - a] for k in names}

    starts = [a for a in range(0, n, read_chunk) if len(sel_of(a))]
    for _, (sel, got) in _ahead(starts, read):
        for k in names:
            buf[k].append(got[k])
        if index:
            buf["source_index"].append(sel.astype(np.int64))
        held += len(sel)
        if held >= out_chunk:
            flush(False)
    flush(True)
