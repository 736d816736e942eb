"""Teacher pair generation: per-seed noise -> teacher sampler -> chunk-aligned shards of one Zarr store.

A pair is a function of (teacher, sampler settings, seed) only. With ``sampler.snapshot_steps`` the
states after those sampler steps are kept too (array ``x_t``, the manifest's ``snapshots``: flow-matching
times t = k / steps, or EDM noise levels t_k). Two samplers (storage_schemas SamplerSettings.kind):

* ``flow-matching-ode``: the 2-D flow-matching teacher's ODE (fixed-step Euler/midpoint/Heun),
  x_T = noise_scale * eps with eps from ``seeded_noise``;
* ``edm-heun``: EDM's deterministic Heun sampler (models.samplers.edm_heun, 18 steps = 35 NFE at 32x32,
  EDM used 40 steps at 64x64) on any teacher as a denoiser (EDM preconditioned U-Nets; flow-matching
  models through FlowMatchingDenoiser). x_T = sigma_max * eps is what is stored (the manifest records
  x_T_scale = sigma_max); eps and, for a conditional teacher, the class label come from the seed's own
  generator (EDM's StackedRandomGenerator semantics, CPU stream).

Sharding and workers. The seeds of each split are cut into shards of ``chunk_size`` (one Zarr chunk
each). Shards are numbered over the train split then the held-out split; worker ``rank`` of
``world_size`` takes the shards whose number is rank mod world_size. Rank and world size come from the
arguments or torchrun's RANK / WORLD_SIZE (LOCAL_RANK picks the GPU for device 'cuda'), so N processes
started with the same command fill one store. Rank 0 is the coordinator: it creates every array,
fully sized, once, before any worker writes (Zarr 3 loses data under concurrent resizes/appends); the
other ranks wait for that. Each shard writes its whole chunk, then a marker file; shards whose marker
exists are skipped, so a run killed at any point (or a lost worker) and restarted with the same command
ends byte-identical to an uninterrupted one. When every marker exists, rank 0 computes the content
hashes, writes the manifests (held-out child first, root last) and renames ``<out>.partial`` to
``<out>``. Batch size and worker count do not enter the version.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
from tqdm import tqdm

from storage_schemas import (HELDOUT_GROUP, MANIFEST_KEY, PairsGenerateConfig, SeedRange, Snapshots,
                             TeacherManifest, TeacherRef, VersionInputs, code_version, recipe_version, store_arrays,
                             utc_now)

from pipeline.storage import artifacts
from pipeline.storage import pairstore
from pipeline.errors import KDMError
from pipeline.storage.manifests import holds_pair_store, read_teacher_manifest

if TYPE_CHECKING:
    import torch

PROGRESS_DIR = "_kdm_progress"
IMAGE_BATCH = 1024   # default seeds per sampler call for image teachers (2-D: a whole shard)
log = logging.getLogger("kdm.generate")


def pairs_version_inputs(teacher_id: str, cfg: PairsGenerateConfig) -> VersionInputs:
    return VersionInputs.of("pairs", recipe_version(), "generate", teacher_id,
                            cfg.model_dump(mode="json", exclude={"device"}))


def pairs_version(teacher_id: str, cfg: PairsGenerateConfig) -> str:
    return pairs_version_inputs(teacher_id, cfg).version


def _shard_marker(group_url: str, index: int) -> str:
    return artifacts.join(group_url, PROGRESS_DIR, f"shard-{index:06d}.done")


def _partial_version(url: str) -> Optional[str]:
    """The version whose shards a killed run left at ``url`` ('' if unknown); None when nothing is there."""
    if not artifacts.exists(artifacts.join(url, "zarr.json")):
        return None
    attrs = pairstore.open_group(url, "r").attrs
    if MANIFEST_KEY in attrs:
        return attrs[MANIFEST_KEY].get("version", "")
    return attrs.get(pairstore.WRITING_KEY, "")


def resolve_workers(rank: Optional[int] = None, world_size: Optional[int] = None) -> tuple[int, int]:
    """(rank, world_size) from the arguments, else torchrun's RANK / WORLD_SIZE, else (0, 1)."""
    try:
        ws = int(world_size if world_size is not None else os.environ.get("WORLD_SIZE", 1))
        r = int(rank if rank is not None else os.environ.get("RANK", 0))
    except ValueError:
        raise KDMError(f"RANK / WORLD_SIZE must be integers (got RANK={os.environ.get('RANK')!r}, "
                       f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r})") from None
    if ws < 1 or not 0 <= r < ws:
        raise KDMError(f"rank {r} is not in [0, world_size={ws})")
    return r, ws


@dataclass(frozen=True)
class Split:
    name: str           # 'train' | 'heldout'
    url: str            # its Zarr group inside the partial store
    seeds: SeedRange


@dataclass(frozen=True)
class Shard:
    number: int         # over all splits, decides the worker
    split: Split
    index: int          # inside its split (chunk index)
    lo: int             # first seed
    hi: int             # seed stop


def plan_shards(splits: list[Split], chunk_size: int) -> list[Shard]:
    out: list[Shard] = []
    for sp in splits:
        n = len(sp.seeds)
        for i in range((n + chunk_size - 1) // chunk_size):
            lo = sp.seeds.start + i * chunk_size
            out.append(Shard(len(out), sp, i, lo, min(lo + chunk_size, sp.seeds.stop)))
    return out


class _Sampler:
    """Turns a list of seeds into (x_T, x_0, label) for one teacher and sampler setting. (torch and the models
    are imported here, once the output and the inputs are known to be worth the work.)"""

    def __init__(self, teacher_url: str, manifest: TeacherManifest, cfg: PairsGenerateConfig, device: torch.device,
                 batch_size: Optional[int], compile: bool = False):
        import torch
        from models.edm import FastDenoiser
        from pipeline.teachers.flow_matching import load_denoiser, load_teacher
        self.cfg, self.device, self.batch_size = cfg, device, batch_size
        self.state_dtype = torch.float64
        s = cfg.sampler
        self.keep = tuple(s.snapshot_steps or ())
        if s.kind == "flow-matching-ode":
            if manifest.kind != "flow-matching-mlp":
                raise KDMError(f"teacher {manifest.id} is an {manifest.kind} denoiser; sample it with sampler kind "
                               f"'edm-heun' (e.g. 18 steps, noise_scale 80), not '{s.kind}'")
            self.velocity, _ = load_teacher(teacher_url, str(device))
            self.shape, self.label_dim = (manifest.model.dim,), 0
        else:
            self.denoiser, _ = load_denoiser(teacher_url, str(device))
            if s.precision in ("bf16", "fp16"):
                self.denoiser = FastDenoiser(self.denoiser, compile=compile,
                                             dtype=torch.bfloat16 if s.precision == "bf16" else torch.float16)
                self.state_dtype = torch.float32
            elif compile:
                self.denoiser = torch.compile(self.denoiser)
            if manifest.kind == "edm":
                m = manifest.model
                self.shape, self.label_dim = (m.img_channels, m.img_resolution, m.img_resolution), m.label_dim
            else:
                self.shape, self.label_dim = (manifest.model.dim,), 0

    def snapshot_spec(self) -> Optional[Snapshots]:
        """What the kept states are (None without ``snapshot_steps``)."""
        s = self.cfg.sampler
        if not self.keep:
            return None
        if s.kind == "flow-matching-ode":
            return Snapshots(count=len(self.keep), axis="flow-matching-time", x_T_level=0.0,
                             levels=tuple(k / s.steps for k in self.keep), solver_steps=self.keep)
        from models.samplers import edm_levels
        t = edm_levels(self.denoiser, s.steps, s.sigma_min, s.noise_scale, s.rho)
        return Snapshots(count=len(self.keep), axis="edm-sigma", x_T_level=t[0],
                         levels=tuple(t[k] for k in self.keep), solver_steps=self.keep)

    def __call__(self, seeds: list[int]) -> dict[str, np.ndarray]:
        """The arrays of the pairs of ``seeds``: x_T, x_0, label (and x_t with snapshots)."""
        import torch
        from models.samplers import edm_heun, edm_latents, integrate_ode, seeded_noise
        s = self.cfg.sampler
        bs = self.batch_size or (min(len(seeds), IMAGE_BATCH) if len(self.shape) > 1 else len(seeds))
        out: dict[str, list] = {"x_T": [], "x_0": [], "label": [], "x_t": []}
        for a in range(0, len(seeds), bs):
            part = seeds[a:a + bs]
            x_t = None
            if s.kind == "flow-matching-ode":
                x_T = seeded_noise(part, self.shape, scale=s.noise_scale)
                with torch.no_grad():
                    x_0 = integrate_ode(self.velocity, x_T.to(self.device), s.steps, s.method, keep=self.keep)
                lab = np.full(len(part), -1, np.int32)
            else:
                eps, ids = edm_latents(part, self.shape, self.label_dim)
                x_T = (eps * s.noise_scale).to(torch.float32)
                onehot = None
                if ids is not None:
                    onehot = torch.eye(self.label_dim, device=self.device)[ids.to(self.device)]
                x_0 = edm_heun(self.denoiser, x_T.to(self.device), onehot, num_steps=s.steps, sigma_min=s.sigma_min,
                               sigma_max=s.noise_scale, rho=s.rho, state_dtype=self.state_dtype, keep=self.keep)
                lab = ids.numpy().astype(np.int32) if ids is not None else np.full(len(part), -1, np.int32)
            if self.keep:
                x_0, x_t = x_0
                out["x_t"].append(x_t.to(torch.float32).cpu().numpy())
            out["x_T"].append(x_T.numpy())
            out["x_0"].append(x_0.to(torch.float32).cpu().numpy())
            out["label"].append(lab)
        return {k: np.concatenate(v) for k, v in out.items() if v}


def _has_manifest(url: str) -> bool:
    """The group at ``url`` holds its manifest (a committed store, or a partial one with only the rename left)."""
    try:
        return artifacts.exists(artifacts.join(url, "zarr.json")) and MANIFEST_KEY in pairstore.open_group(url, "r").attrs
    except Exception:   # zarr.json being rewritten: not yet
        return False


def _layout_ready(tmp: str, splits: list[Split], version: str, names: tuple[str, ...]) -> bool:
    """Rank 0 has created every array (``names``) of every split for ``version`` (the root's writing key is
    set last)."""
    try:
        if _partial_version(tmp) != version:
            return False
    except Exception:   # zarr.json being rewritten by the coordinator: not ready yet
        return False
    return all(artifacts.exists(artifacts.join(sp.url, a, "zarr.json")) for sp in splits for a in names)


def _create_layout(out: str, splits: list[Split], version: str, sample_shape: tuple[int, ...], chunk: int,
                   snapshots: int) -> None:
    for sp in splits:                    # root first: creating it wipes what is under it
        pairstore.create_arrays(sp.url, len(sp.seeds), sample_shape, chunk, snapshots=snapshots)
    for sp in reversed(splits):          # the root's key last: it marks the layout complete
        pairstore.open_group(sp.url, "r+").attrs[pairstore.WRITING_KEY] = version


def _wait(what: str, ready: Callable[[], bool], poll_s: float, timeout_s: Optional[float]) -> None:
    t0 = time.time()
    while not ready():
        if timeout_s is not None and time.time() - t0 > timeout_s:
            raise KDMError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


def generate_pairs(teacher_url: str, cfg: PairsGenerateConfig, out: str, progress: bool = True,
                   on_shard: Optional[Callable[[int, int], None]] = None, *, rank: Optional[int] = None,
                   world_size: Optional[int] = None, batch_size: Optional[int] = None, poll_s: float = 1.0,
                   wait_timeout_s: Optional[float] = None, compile: bool = False) -> str:
    """Generate (or find) the pair store at ``out``; returns its version.

    ``on_shard(i, n)`` is called after each shard this worker computes (i: the shard's index in its
    split, n: shards of that split this call computes). ``rank`` / ``world_size`` (default: torchrun's
    environment, else 0 / 1): this process's share. ``batch_size``: seeds per sampler call (default: a
    whole shard for 2-D points, at most IMAGE_BATCH images). Ranks other than 0 return once their shards
    are written; rank 0 returns after the commit. ``wait_timeout_s`` bounds the waits for the layout /
    the other workers (default: none). ``compile``: torch.compile the teacher network (for speed; the
    precision is set by ``cfg.sampler.precision``, part of the store's version; compiled kernels may round
    differently in the last bits).
    """
    rank, world_size = resolve_workers(rank, world_size)
    lock = artifacts.writer_lock(out, "kdm pairs generate") if rank == 0 else contextlib.nullcontext()
    with lock:
        return _generate_pairs(teacher_url, cfg, out, progress, on_shard, rank, world_size, batch_size, poll_s,
                               wait_timeout_s, compile)


def _generate_pairs(teacher_url: str, cfg: PairsGenerateConfig, out: str, progress: bool,
                    on_shard: Optional[Callable[[int, int], None]], rank: int, world_size: int,
                    batch_size: Optional[int], poll_s: float, wait_timeout_s: Optional[float], compile: bool) -> str:
    manifest = read_teacher_manifest(teacher_url)
    version = pairs_version(manifest.id, cfg)
    if holds_pair_store(out, version):
        return version
    device_name = cfg.device
    if device_name == "cuda" and world_size > 1 and "LOCAL_RANK" in os.environ:
        device_name = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    from pipeline.devices import resolve_device
    device = resolve_device(device_name)
    sampler = _Sampler(teacher_url, manifest, cfg, device, batch_size, compile=compile)
    sample_shape = sampler.shape
    snap = sampler.snapshot_spec()
    names = store_arrays(snap is not None)

    tmp = artifacts.partial_url(out)
    splits = [Split("train", tmp, cfg.seeds)]
    if cfg.heldout_seeds is not None:
        splits.append(Split("heldout", artifacts.join(tmp, HELDOUT_GROUP), cfg.heldout_seeds))
    if rank == 0:
        artifacts.begin(out)                          # keeps finished shards of a killed run
        if _partial_version(tmp) not in (None, version):
            artifacts.begin(out, fresh=True)          # left by a run of another config: its shards are not ours
        elif _has_manifest(tmp):                         # killed between the manifest and the rename
            _commit(out, splits)
            return version
        if not _layout_ready(tmp, splits, version, names):
            _create_layout(out, splits, version, sample_shape, cfg.chunk_size, snap.count if snap else 0)
    else:
        def ready() -> bool:
            return _has_manifest(out) or _has_manifest(tmp) or _layout_ready(tmp, splits, version, names)
        _wait(f"rank 0 to create the arrays of {tmp}", ready, poll_s, wait_timeout_s)
        if _has_manifest(out) or _has_manifest(tmp):        # all shards were done: nothing left for this worker
            return version

    shards = plan_shards(splits, cfg.chunk_size)
    mine = [sh for sh in shards if sh.number % world_size == rank]
    todo = [sh for sh in mine if not artifacts.exists(_shard_marker(sh.split.url, sh.index))]
    groups = {sp.name: pairstore.open_group(sp.url, "r+") for sp in splits}
    per_split = {sp.name: sum(1 for sh in todo if sh.split.name == sp.name) for sp in splits}
    total = sum(sh.hi - sh.lo for sh in mine)
    remaining = sum(sh.hi - sh.lo for sh in todo)
    what = " + ".join(f"{sp.name} {sp.seeds.text()}" for sp in splits)
    bar = tqdm(total=total, initial=total - remaining, desc=f"pairs {what}" + (f" [rank {rank}/{world_size}]"
               if world_size > 1 else ""), unit="pair", disable=not progress, mininterval=1.0)
    t0, done = time.time(), 0
    for sh in todo:
        _run_shard(sampler, groups, sh, cfg.chunk_size)
        done += sh.hi - sh.lo
        rate = done / max(time.time() - t0, 1e-9)
        bar.update(sh.hi - sh.lo)
        bar.set_postfix(pairs_per_s=f"{rate:.0f}")
        log.info("shard %s/%d (seeds %d-%d) done, %.1f pairs/s", sh.split.name, sh.index, sh.lo, sh.hi - 1, rate)
        if on_shard is not None:
            on_shard(sh.index, per_split[sh.split.name])
    bar.close()
    if rank != 0:
        return version

    _wait(f"all {len(shards)} shards of {tmp} (other workers)",
          lambda: all(artifacts.exists(_shard_marker(sh.split.url, sh.index)) for sh in shards), poll_s,
          wait_timeout_s)
    common = dict(origin="teacher", chunk_size=cfg.chunk_size, sampler=cfg.sampler,
                  teacher=TeacherRef(id=manifest.id, sha256=manifest.weights_sha256, kind=manifest.kind),
                  x_T_scale=cfg.sampler.noise_scale, num_classes=sampler.label_dim, code_version=code_version(),
                  version_inputs=pairs_version_inputs(manifest.id, cfg), snapshots=snap)
    # Before the commit, every finished shard (this run's, a killed run's, other workers') is checked
    # against the digests its marker recorded when it was written: a shard whose chunk was lost or altered
    # since is computed again (once); the same pass gives the manifest's content hash and chunk digests.
    # Then the manifests of the children first, the root's last (the markers stay until then, so a late
    # worker finds nothing to do), then the progress markers go and the directory is renamed.
    with warnings.catch_warnings():   # zarr notes the marker folder while listing the arrays
        warnings.filterwarnings("ignore", message=f".*{PROGRESS_DIR}.*")
        scans = _verified_scans(sampler, splits, shards, cfg.chunk_size, on_shard, names)
        for sp in reversed(splits):
            group = pairstore.open_group(sp.url, "r+")
            pairstore.finalize(group, scanned=scans[sp.name],
                               version=version if sp.name == "train" else f"{version}-heldout",
                               split=sp.name, seeds=sp.seeds, created=utc_now(), **common)
    _commit(out, splits)
    return version


def _run_shard(sampler: "_Sampler", groups: dict, sh: Shard, chunk_size: int) -> None:
    """Compute one shard, write its chunk, then its marker (which records the digest of each array's chunk)."""
    data = sampler(list(range(sh.lo, sh.hi))) | {"seed": np.arange(sh.lo, sh.hi, dtype=np.int64)}
    pairstore.write_region(groups[sh.split.name], sh.index * chunk_size, data)
    digests = {k: pairstore.chunk_digest(np.asarray(v, dtype=pairstore.DTYPES[k])) for k, v in data.items()}
    artifacts.write_bytes(_shard_marker(sh.split.url, sh.index), json.dumps(digests, sort_keys=True).encode())


def _marker_digests(sh: Shard) -> Optional[dict]:
    """The digests a shard's marker recorded; None for an empty marker (written by an older kdm)."""
    raw = artifacts.read_bytes(_shard_marker(sh.split.url, sh.index))
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return {}          # a torn marker: the shard is computed again


def _damaged_shards(splits: list[Split], shards: list[Shard], scans: dict, names: tuple[str, ...]
                    ) -> list[tuple[Shard, str]]:
    bad = []
    groups = {sp.name: pairstore.open_group(sp.url, "r") for sp in splits}
    for sh in shards:
        digests = _marker_digests(sh)
        group = groups[sh.split.name]
        for name in names:
            got = scans[sh.split.name][1][name][sh.index]
            if digests is None:      # no digest recorded: the chunk must at least exist
                if not pairstore.chunk_present(group[name], sh.index):
                    bad.append((sh, f"{name} chunk {sh.index} is missing"))
                    break
            elif digests.get(name) != got:
                what = ("is missing" if not pairstore.chunk_present(group[name], sh.index) else
                        "is unreadable" if got == pairstore.UNREADABLE else "was altered")
                bad.append((sh, f"{name} chunk {sh.index} {what}"))
                break
    return bad


def _verified_scans(sampler: "_Sampler", splits: list[Split], shards: list[Shard], chunk_size: int,
                    on_shard: Optional[Callable[[int, int], None]], names: tuple[str, ...]) -> dict:
    """{split: pairstore.scan(group)} once every shard matches its marker; damaged shards are recomputed."""
    for attempt in (1, 2):
        scans = {sp.name: pairstore.scan(pairstore.open_group(sp.url, "r"), names, tolerant=True)
                 for sp in splits}
        bad = _damaged_shards(splits, shards, scans, names)
        if not bad:
            return scans
        where = "; ".join(f"{sh.split.name} shard {sh.index} (seeds {sh.lo}-{sh.hi - 1}): {why}" for sh, why in bad)
        if attempt == 2:
            raise KDMError(f"finished shards of {artifacts.partial_url(splits[0].url)} keep failing their check "
                           f"after being computed again ({where}); the disk may be failing: check it and rerun")
        log.warning("recomputing %d finished shard(s) whose data changed after they were written: %s", len(bad), where)
        groups = {sp.name: pairstore.open_group(sp.url, "r+") for sp in splits}
        for sh, _ in bad:
            _run_shard(sampler, groups, sh, chunk_size)
            if on_shard is not None:
                on_shard(sh.index, sum(1 for b, _ in bad if b.split.name == sh.split.name))
    raise AssertionError("unreachable")


def _commit(out: str, splits: list[Split]) -> None:
    for sp in splits:
        fs, path = artifacts.url_to_fs(artifacts.join(sp.url, PROGRESS_DIR))
        if fs.exists(path):
            fs.rm(path, recursive=True)
    artifacts.commit(out)
