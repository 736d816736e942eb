"""Is the network source embedded in an EDM pickle stock EDM? Fingerprints of ``training/networks.py``.

An EDM network pickle carries the full source of the module that defined its classes (``module_src``,
see pipeline.teachers.edm_pickle). kdm never runs it: it rebuilds the network from its own
implementation of stock EDM and loads the weights, which succeeds for any fork with the same parameter
shapes, even one whose forward pass computes something else. So the importer compares the embedded
source with the known layouts of NVlabs/edm ``training/networks.py`` (the two versions in its history:
the initial release and the fix of the fused up-sampling padding) and records the result in the teacher
manifest (``EDMPickleSource.network_source`` / ``source_warnings``). The comparison is per top-level
definition (``weight_init``, ``Conv2d``, ``SongUNet``, ``EDMPrecond``, ..., plus the module-level
statements), on the text with comments, blank lines and trailing whitespace removed, so a changed
license header or comment is not a difference but any changed statement is. Only hashes of EDM's file
are stored here. ``python -m pipeline.teachers.edm_source PATH/training/networks.py`` prints the
fingerprints of a file (how the table below was made, from the NVlabs/edm repository at commits
0a2ff34 and b2a26c9). The released pickles themselves were not available to check against.
"""
from __future__ import annotations

import ast
import hashlib
import sys
from typing import Iterable, Optional

MODULE = "<module-level statements>"

# layout name -> {definition name: fingerprint}
KNOWN_LAYOUTS: dict[str, dict[str, str]] = {}   # filled in below


def _normalized(lines: list[str]) -> str:
    out = []
    for ln in lines:
        ln = ln.rstrip()
        if ln.strip() and not ln.lstrip().startswith("#"):
            out.append(ln)
    return "\n".join(out)


def fingerprints(src: str) -> dict[str, str]:
    """``{definition name: sha256 prefix}`` of the top-level classes and functions of ``src`` (parsed,
    never executed) and of everything else at module level (``MODULE``). SyntaxError if it does not parse."""
    tree = ast.parse(src)
    lines = src.splitlines()
    defs: dict[str, list[str]] = {}
    module: list[str] = []
    for node in tree.body:
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        text = lines[start - 1:node.end_lineno]
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            name = node.name if node.name not in defs else f"{node.name} (redefined at line {node.lineno})"
            defs[name] = text
        elif not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                  and isinstance(node.value.value, str)):   # the module docstring is not code
            module += text
    out = {name: hashlib.sha256(_normalized(text).encode()).hexdigest()[:16] for name, text in defs.items()}
    out[MODULE] = hashlib.sha256(_normalized(module).encode()).hexdigest()[:16]
    return out


def check_network_source(sources: Iterable[Optional[str]]) -> tuple[str, list[str]]:
    """(layout, warnings) for the module sources embedded in a pickled network (one per persistent
    object; normally all the same file). ``layout`` is the name of the known EDM layout they match, or
    'modified' (then ``warnings`` say what differs from the closest known layout) or 'unknown' (no
    source, or one that does not parse)."""
    distinct = sorted({s for s in sources if s})
    if not distinct:
        return "unknown", ["the pickle embeds no network source (module_src) to compare with EDM's "
                           "training/networks.py; it cannot be told from a modified fork"]
    warnings: list[str] = []
    if len(distinct) > 1:
        warnings.append(f"the network's classes come from {len(distinct)} different embedded source modules; "
                        f"stock EDM defines them all in one file, training/networks.py")
    layouts = []
    for src in distinct:
        try:
            fp = fingerprints(src)
        except SyntaxError as e:
            return "unknown", warnings + [f"the embedded network source does not parse ({e.msg}, line {e.lineno}); "
                                          f"it cannot be compared with EDM's training/networks.py"]
        best, best_diff = None, None
        for name, known in KNOWN_LAYOUTS.items():
            changed = sorted(k for k in known if k in fp and fp[k] != known[k])
            missing = sorted(k for k in known if k not in fp)
            added = sorted(k for k in fp if k not in known)
            n = len(changed) + len(missing) + len(added)
            if best_diff is None or n < best_diff[0]:
                best, best_diff = name, (n, changed, missing, added)
        if best_diff is not None and best_diff[0] == 0:
            layouts.append(best)
            continue
        if best is None:
            return "unknown", warnings + ["no known EDM training/networks.py layout to compare the embedded source with"]
        _, changed, missing, added = best_diff
        parts = ([f"changed: {', '.join(changed)}"] if changed else []) + \
                ([f"missing: {', '.join(missing)}"] if missing else []) + \
                ([f"not in EDM: {', '.join(added)}"] if added else [])
        warnings.append(f"the embedded network source differs from EDM's training/networks.py (closest known "
                        f"layout {best}; {'; '.join(parts)}): kdm rebuilt the network from stock EDM and loaded "
                        f"the weights, so a modified fork with the same parameter shapes would not compute what its "
                        f"authors' code does; check the source before trusting this teacher")
    if warnings:
        return "modified", warnings
    return (layouts[0] if len(set(layouts)) == 1 else "modified"), warnings


KNOWN_LAYOUTS.update({
    # generated by `python -m pipeline.teachers.edm_source` from NVlabs/edm training/networks.py
    "NVlabs/edm@0a2ff34": {
        "weight_init": "f8525ee4b3f8de8a", "Linear": "84c0fd05df5a5ef4", "Conv2d": "691b34cfa19c4a23",
        "GroupNorm": "255d578cac4af87d", "AttentionOp": "46b27d35ad4e0a80", "UNetBlock": "bacce41359290a44",
        "PositionalEmbedding": "4b9cb638decfb28e", "FourierEmbedding": "2a79d62220062ef2",
        "SongUNet": "f1f1cf950b49b766", "DhariwalUNet": "7424bc1b86481949", "VPPrecond": "cf084bbb95f59cf1",
        "VEPrecond": "1839a171b249192e", "iDDPMPrecond": "1f77ce67a98f399a", "EDMPrecond": "959bcb20bcf5eb98",
        "<module-level statements>": "e3cf6814eb326d2f"},
    "NVlabs/edm@b2a26c9": {
        "weight_init": "f8525ee4b3f8de8a", "Linear": "84c0fd05df5a5ef4", "Conv2d": "01a9a59fba992ba9",
        "GroupNorm": "255d578cac4af87d", "AttentionOp": "46b27d35ad4e0a80", "UNetBlock": "bacce41359290a44",
        "PositionalEmbedding": "4b9cb638decfb28e", "FourierEmbedding": "2a79d62220062ef2",
        "SongUNet": "f1f1cf950b49b766", "DhariwalUNet": "7424bc1b86481949", "VPPrecond": "cf084bbb95f59cf1",
        "VEPrecond": "1839a171b249192e", "iDDPMPrecond": "1f77ce67a98f399a", "EDMPrecond": "959bcb20bcf5eb98",
        "<module-level statements>": "e3cf6814eb326d2f"},
})


if __name__ == "__main__":
    import json
    for path in sys.argv[1:]:
        with open(path, encoding="utf-8") as f:
            print(json.dumps(fingerprints(f.read()), indent=4))
