"""Helpers shared by the ``kdm`` command modules (pipeline/cli.py, cli_images.py, cli_eval.py):
the summary line, sub-command registration, and the option -> config steps of the pair commands."""
from __future__ import annotations

import argparse


def summary(msg: str) -> None:
    """Every command ends with a one-line summary on stdout."""
    print(msg, flush=True)


def add_command(parent, name: str, fn, help_: str, epilog=None) -> argparse.ArgumentParser:
    """Sub-command ``name`` of ``parent`` (an argparse subparsers action) that runs ``fn(args)``; it takes
    -q/--quiet (no progress bars)."""
    sp = parent.add_parser(name, help=help_, description=help_, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.set_defaults(fn=fn)
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return sp


def pairs_generate_config(a, sampler: dict, source: str):
    """A PairsGenerateConfig from --seeds, --heldout-seeds, --chunk-size, --device and ``sampler``."""
    from storage_schemas import PairsGenerateConfig, SeedRange
    from pipeline import presets
    fields = {"seeds": SeedRange.parse(a.seeds).model_dump(), "chunk_size": a.chunk_size, "device": a.device,
              "heldout_seeds": SeedRange.parse(a.heldout_seeds).model_dump() if a.heldout_seeds else None,
              "sampler": sampler}
    return presets.validate(PairsGenerateConfig, fields, source)


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
