"""The NFE a student can sample with, checked without importing torch (a CLI error comes before heavy imports)."""
from __future__ import annotations

from pipeline.errors import KDMError


def check_nfe(nfe: int, nfes, what: str = "the student") -> None:
    """KDMError unless ``nfe`` is one of the NFEs ``nfes`` the student was trained for."""
    nfes = tuple(nfes)
    if nfe not in nfes:
        raise KDMError(f"NFE {nfe}: {what} samples with NFE {', '.join(map(str, nfes))}, the ones it was trained for"
                       + (" (a one-step student; train with model.nfe_train on a store with trajectory snapshots for "
                          "more)" if nfes == (1,) else ""))
