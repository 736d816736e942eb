"""Check pipeline.teachers.edm_source's shipped fingerprints against copies of NVlabs/edm's
training/networks.py (not committed: EDM's code is CC BY-NC-SA), e.g. from a checkout of that repository:

    python bench/check_edm_fingerprints.py /path/to/edm/training/networks.py [more copies ...]

Exit 0 when every file matches a known layout without warnings.
"""
import sys
from pathlib import Path

from pipeline.teachers import edm_source


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__)
        return 2
    bad = 0
    for p in paths:
        layout, warnings = edm_source.check_network_source([Path(p).read_text()])
        ok = layout in edm_source.KNOWN_LAYOUTS and not warnings
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'} {p}: {layout} {warnings or ''}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
