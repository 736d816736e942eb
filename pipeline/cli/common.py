"""Helpers shared by the ``kdm`` command modules (pipeline/cli.py, cli_images.py, cli_eval.py):
the summary line, sub-command registration, and the option -> config steps of the pair commands."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.errors import KDMError


def summary(msg: str) -> None:
    """Every command ends with a one-line summary on stdout."""
    print(msg, flush=True)


def plus_minus(stderr) -> str:
    """The text " ± <s.e.>" after a mean with a known standard error ("" for reports written before it existed)."""
    return f" ± {stderr:.2g}" if stderr is not None else ""


def require_local_input(path: str, what: str) -> None:
    """A local input that does not exist fails before torch or Zarr is imported (a fast, clear error)."""
    if "://" not in path and not Path(path).exists():
        raise KDMError(f"{what} {path} does not exist; check the path")


def add_command(parent, name: str, fn, help_: str, epilog=None) -> argparse.ArgumentParser:
    """Sub-command ``name`` of ``parent`` (an argparse subparsers action) that runs ``fn(args)``; it takes
    -q/--quiet (no progress bars)."""
    sp = parent.add_parser(name, help=help_, description=help_, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.set_defaults(fn=fn)
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return sp


MAX_SEED = 2 ** 63 - 1     # seeds are stored as int64
MAX_SHARDS = 1_000_000     # shards one generation plans (seed range / chunk size)


def pairs_generate_config(a, sampler: dict, source: str):
    """A PairsGenerateConfig from --seeds, --heldout-seeds, --chunk-size, --device and ``sampler``."""
    from storage_schemas import PairsGenerateConfig, SeedRange
    from pipeline import presets
    for opt, text in (("--seeds", a.seeds), ("--heldout-seeds", a.heldout_seeds)):
        if text and text.strip().startswith("-"):
            raise ValueError(f"{opt} {text}: seeds are non-negative integers; give a range START-END with "
                             f"0 <= START <= END, e.g. 0-49999")
    ranges = {"--seeds": SeedRange.parse(a.seeds), "--heldout-seeds": SeedRange.parse(a.heldout_seeds) if a.heldout_seeds else None}
    for opt, r in ranges.items():
        if r is None:
            continue
        if r.stop - 1 > MAX_SEED:
            raise ValueError(f"{opt} {r.text()}: seeds must be at most {MAX_SEED} (they are stored as int64)")
        if a.chunk_size and a.chunk_size > 0 and -(-(r.stop - r.start) // a.chunk_size) > MAX_SHARDS:
            raise ValueError(f"{opt} {r.text()} with --chunk-size {a.chunk_size} makes "
                             f"{-(-(r.stop - r.start) // a.chunk_size):,} shards (at most {MAX_SHARDS:,}); "
                             f"use a smaller seed range or a larger --chunk-size")
    fields = {"seeds": ranges["--seeds"].model_dump(), "chunk_size": a.chunk_size, "device": a.device,
              "heldout_seeds": ranges["--heldout-seeds"].model_dump() if ranges["--heldout-seeds"] else None,
              "sampler": sampler}
    return presets.validate(PairsGenerateConfig, fields, source)


def parse_int_list(text: str, option: str) -> list[int]:
    """'4,9,13' -> [4, 9, 13]; ValueError naming ``option`` otherwise."""
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"{option} {text!r}: expected integers separated by commas, e.g. 4,9,13") from None


def add_snapshot_options(sp) -> None:
    """--snapshots K / --snapshot-steps LIST of the pair generators."""
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--snapshots", type=int, default=None, metavar="K",
                   help="keep K intermediate states of each trajectory (array x_t), after sampler steps spread evenly "
                        "(round(i steps / (K + 1))), for multi-step students")
    g.add_argument("--snapshot-steps", default=None, metavar="I,J,...",
                   help="keep the states after these sampler steps (increasing, in [1, steps - 1])")


def snapshot_steps_option(a, steps: int) -> dict:
    """The sampler's ``snapshot_steps`` from --snapshots / --snapshot-steps ({} when neither is given)."""
    if getattr(a, "snapshot_steps", None):
        return {"snapshot_steps": parse_int_list(a.snapshot_steps, "--snapshot-steps")}
    if getattr(a, "snapshots", None) is not None:
        from storage_schemas import SamplerSettings
        return {"snapshot_steps": list(SamplerSettings.even_snapshots(steps, a.snapshots))}
    return {}


def heldout_count(cfg) -> int:
    """Held-out seeds of a PairsGenerateConfig (0 without a held-out range)."""
    return len(cfg.heldout_seeds) if cfg.heldout_seeds else 0


def pairs_dry_run(cfg, version: str, out: str) -> None:
    summary(f"dry run: would write {len(cfg.seeds)} pairs (+{heldout_count(cfg)} held out), version {version}, "
            f"{cfg.sampler.nfe} NFE per pair -> {out}")


def pairs_import_config(a, source: str, **fields):
    """A PairsImportConfig from --format, --holdout, --split-seed, --chunk-size and ``fields``."""
    from storage_schemas import PairsImportConfig
    from pipeline import presets
    return presets.validate(PairsImportConfig, {"format": a.format, "holdout_fraction": a.holdout,
                                                "split_seed": a.split_seed, "chunk_size": a.chunk_size, **fields},
                            source)


def open_pairs(url: str):
    """(the pair store at ``url``, the size of its held-out split or 0)."""
    from pipeline.storage.pairstore import PairStore
    s = PairStore.open(url)
    held = s.heldout()
    return s, len(held) if held else 0
