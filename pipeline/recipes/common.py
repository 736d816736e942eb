"""Stages both recipes share: teacher pairs through ``pipeline.pairs.generate`` and the pair-store summary."""
from __future__ import annotations

from pipeline.stages import GPU_POOL, CPU_POOL, Stage, StageContext
from pipeline.storage import artifacts


def pairs_summary(uri: str) -> dict:
    """Small dict of a committed pair store (counts, versions; a filtered store adds its counts per reason)."""
    from pipeline.storage.pairstore import PairStore
    s = PairStore.open(uri)
    held = s.heldout()
    m = s.manifest
    out = {"uri": uri, "version": s.version, "content_hash": m.content_hash, "count": len(s),
           "heldout_count": len(held) if held else 0}
    if m.teacher is not None:
        out["teacher_id"] = m.teacher.id
    if m.sampler is not None:
        out["nfe"] = m.sampler.nfe
    if m.filter is not None:
        out["counts"] = dict(m.filter.counts)
        out["source_version"] = m.filter.source_version
    return out


def pairs_lineage(name: str, s: dict) -> str:
    text = (f"{name} `{s['version']}` ({s['count']} train + {s['heldout_count']} held out"
            + (f", {s['nfe']} NFE" if s.get("nfe") else "") + f", content `{s['content_hash'][:16]}`)")
    if "counts" in s:
        dropped = ", ".join(f"{k} {v}" for k, v in s["counts"].items() if k != "kept")
        text += f"; kept {s['counts'].get('kept', s['count'])}, dropped {dropped}"
    return text


class PairStoreStage(Stage):
    """A stage whose output is a pair store (committed when its group exists: the manifest is its attribute)."""

    kind = "pairs"
    lineage_name = "pairs"

    def done(self, out):
        return artifacts.exists(out)

    def summary(self, cfg, uris, out):
        return pairs_summary(out)

    def lineage(self, s):
        return pairs_lineage(self.lineage_name, s)


class PairsStage(PairStoreStage):
    """Teacher pairs: per-seed noise through the teacher's deterministic ODE (2-D: midpoint/Euler/Heun;
    images: EDM Heun), train and held-out seeds, at ``<root>/pairs/<version>``. On the GPU pool for image
    recipes; ``gpus`` > 1 runs ``kdm pairs generate`` in that many processes under torchrun."""

    name, inputs = "pairs", ("teacher",)
    progress_label = "teacher pair generation (shards of the split in progress)"

    def generate_config(self, cfg):
        return cfg.pairs.generate_config(cfg.device) if cfg.recipe == "cifar10" else cfg.pairs

    def output(self, cfg, uris):
        from pipeline.pairs.generate import pairs_version
        from pipeline.storage.manifests import read_teacher_manifest
        gen = self.generate_config(cfg).model_copy(update={"device": "cpu"})   # the device enters no version
        return artifacts.join(cfg.root, "pairs", pairs_version(read_teacher_manifest(uris["teacher"]).id, gen))

    def pool(self, cfg):
        return GPU_POOL if cfg.recipe == "cifar10" else CPU_POOL

    def device(self, cfg):
        return cfg.device if cfg.recipe == "cifar10" else cfg.pairs.device

    def run(self, cfg, uris, out, ctx: StageContext):
        from pipeline.pairs import generate
        gpus = getattr(cfg, "gpus", 1)
        batch = cfg.pairs.batch_size if cfg.recipe == "cifar10" else None
        if gpus == 1:
            generate.generate_pairs(uris["teacher"], self.generate_config(cfg), out, progress=ctx.progress_bars,
                                    on_shard=lambda i, n: ctx.progress((i + 1) / max(n, 1), f"shard {i + 1}/{n}"),
                                    batch_size=batch)
            return {}
        from pipeline.training.torchrun import run_kdm_command
        args = ["pairs", "generate-images", "--teacher", uris["teacher"], "--out", out]
        args += ["--batch", str(batch)] if batch else []
        run_kdm_command(gpus, self.device(cfg), args, self.generate_config(cfg).model_dump(mode="json"),
                        "pairs stage", quiet=not ctx.progress_bars)
        return {}
