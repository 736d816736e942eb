"""The project's read-only data (``shared/data`` next to the checkout, see ../shared/README.md).

A checkout may sit deeper than its ``shared`` sibling (a git worktree under ``wt/<name>``), so every
parent of the repository is tried; ``KDM_SHARED_DATA`` names the folder explicitly.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def shared_data(name: str) -> Path:
    """The path of ``shared/data/<name>``: the first that exists, else the sibling one (``require`` fails on it)."""
    if os.environ.get("KDM_SHARED_DATA"):
        return Path(os.environ["KDM_SHARED_DATA"]) / name
    for parent in REPO.parents:
        if (parent / "shared" / "data" / name).exists():
            return parent / "shared" / "data" / name
    return REPO.parent / "shared" / "data" / name


def shared_data_dir() -> Path:
    """The shared data folder (what tests and .ci/run give as KDM_DATA_DIR)."""
    return shared_data("cifar10-jpeg.tar.gz").parent


def require(path: Path) -> Path:
    """``path`` when it exists; a test failure that says where the data should be otherwise (the project's
    data is part of its environment, never a reason to skip)."""
    if not path.exists():
        import pytest
        pytest.fail(f"{path} is missing: the shared data folder (shared/data beside the checkout) holds it; set "
                    f"KDM_SHARED_DATA to its location")
    return path
