"""The project's read-only data (``shared/data`` next to the checkout, see ../shared/README.md).

A checkout may sit deeper than its ``shared`` sibling (a git worktree under ``wt/<name>``), so every
parent of the repository is tried; ``KDM_SHARED_DATA`` names the folder explicitly.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def shared_data(name: str) -> Path:
    """The path of ``shared/data/<name>``: the first that exists, else the sibling one (tests skip on it,
    which fails under CI=true)."""
    if os.environ.get("KDM_SHARED_DATA"):
        return Path(os.environ["KDM_SHARED_DATA"]) / name
    for parent in REPO.parents:
        if (parent / "shared" / "data" / name).exists():
            return parent / "shared" / "data" / name
    return REPO.parent / "shared" / "data" / name
