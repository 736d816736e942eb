"""Byte-level comparison of pair stores, shared by the pair-generation tests (2-D and image)."""
from __future__ import annotations

from pathlib import Path

from pipeline.storage.pairstore import PairStore


def data_files(root: str) -> dict[str, bytes]:
    """Every file of a store except group metadata (which holds the creation time)."""
    base = Path(root)
    group_meta = {base / "zarr.json", base / "heldout" / "zarr.json"}
    return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*"))
            if p.is_file() and p not in group_meta}


def assert_same_store(a: str, b: str) -> None:
    """Stores ``a`` and ``b`` (each with a held-out split) hold the same chunk files, hashes and arrays."""
    fa, fb = data_files(a), data_files(b)
    assert sorted(fa) == sorted(fb)
    assert any("/c/" in k for k in fa)       # chunk files are compared, not just metadata
    for k in fa:
        assert fa[k] == fb[k], f"{k} differs"
    sa, sb = PairStore.open(a), PairStore.open(b)
    assert sa.manifest.content_hash == sb.manifest.content_hash
    assert sa.heldout().manifest.content_hash == sb.heldout().manifest.content_hash
    for name in ("x_T", "x_0", "label", "seed"):
        assert sa.group[name][:].tobytes() == sb.group[name][:].tobytes()


def smoke_pairs(root: Path, count: int, chunk_size: int) -> str:
    """A 2-D pair store of ``count`` train pairs (no held-out split) from the smoke teacher, trained under ``root``."""
    from pipeline.pairs import generate
    from pipeline import presets
    from pipeline.teachers import flow_matching as teacher
    from storage_schemas import PairsGenerateConfig, SamplerSettings, SeedRange
    t = str(root / "teacher")
    teacher.train_teacher(presets.load("teacher", "smoke"), t, progress=False)
    cfg = PairsGenerateConfig(seeds=SeedRange(start=0, stop=count), heldout_seeds=None,
                              sampler=SamplerSettings(method="euler", steps=3), chunk_size=chunk_size)
    out = str(root / "pairs")
    generate.generate_pairs(t, cfg, out, progress=False)
    return out
