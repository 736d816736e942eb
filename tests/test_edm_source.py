"""pipeline.teachers.edm_source: the network source embedded in an EDM pickle, compared with EDM's known
training/networks.py layouts, and the importer's record of the result.

EDM's own file is not part of this repository: bench/check_edm_fingerprints.py checks the fingerprint table
against copies of it (e.g. ``git show b2a26c9:training/networks.py`` of NVlabs/edm). The logic is tested
with the stand-in EDM source of tests/edm_persistence.py registered as a known layout."""
from __future__ import annotations

from pathlib import Path

import pytest

from edm_persistence import make_pickles, networks_source, write_fake_edm
from pipeline.storage import artifacts
from pipeline.teachers import edm_source
from pipeline.teachers.edm_pickle import import_edm_pickle
from pipeline.teachers.edm_source import MODULE, check_network_source, fingerprints

KWARGS = dict(img_resolution=8, img_channels=3, label_dim=0, use_fp16=False, model_type="SongUNet",
              model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
# A fork with the same parameter shapes: EDMPrecond's skip scaling changed.
SKIP = "c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)"


@pytest.fixture
def fake_is_known(monkeypatch):
    monkeypatch.setattr(edm_source, "KNOWN_LAYOUTS", {"fake-edm@1": fingerprints(networks_source())})


def test_fingerprints_ignore_comments_and_blank_lines_not_code():
    src = networks_source()
    fp = fingerprints(src)
    assert {"SongUNet", "UNetBlock", "Conv2d", "EDMPrecond", "VPPrecond", MODULE} <= set(fp)
    assert fingerprints("# another header\n" + src.replace("\n\n", "\n\n\n") + "\n# trailing comment\n") == fp
    assert SKIP in src
    changed = fingerprints(src.replace(SKIP, SKIP + " * 1.01"))
    assert {k for k in fp if fp[k] != changed[k]} == {"EDMPrecond"}
    assert fingerprints(src.replace("import math\n", "import math\nimport os\n", 1))[MODULE] != fp[MODULE]


def test_check_network_source(fake_is_known):
    src = networks_source()
    assert check_network_source([src, src, None]) == ("fake-edm@1", [])
    layout, [w] = check_network_source([src.replace(SKIP, SKIP + " * 1.01")])
    assert layout == "modified" and "closest known layout fake-edm@1; changed: EDMPrecond" in w
    assert "a modified fork with the same parameter shapes" in w
    layout, [w] = check_network_source([src + "\n\nclass Extra:\n    pass\n"])
    assert layout == "modified" and "not in EDM: Extra" in w
    cut = src.split("@persistence.persistent_class\nclass VPPrecond", 1)[0]
    layout, [w] = check_network_source([cut])
    assert "missing: " in w and "EDMPrecond" in w and "VPPrecond" in w
    layout, ws = check_network_source([src, src + "\n# only a comment\nX = 1\n"])
    assert layout == "modified" and "2 different embedded source modules" in ws[0]
    assert check_network_source([])[0] == "unknown" and check_network_source([None])[0] == "unknown"
    layout, [w] = check_network_source(["def broken(:\n"])
    assert layout == "unknown" and "does not parse" in w


def test_the_importer_records_the_check(tmp_path, monkeypatch, capsys):
    code = write_fake_edm(tmp_path / "edm")
    fork = write_fake_edm(tmp_path / "fork")
    net = fork / "training" / "networks.py"
    net.write_text(net.read_text().replace(SKIP, SKIP + " * 1.01"))
    stock_pkl, fork_pkl = make_pickles(code, [(tmp_path / "stock.pkl", KWARGS, "EDMPrecond")])[0], \
        make_pickles(fork, [(tmp_path / "fork.pkl", KWARGS, "EDMPrecond")])[0]

    def imp(pkl, out):
        return import_edm_pickle(str(pkl), str(tmp_path / out), allow_pickle=True,
                                 sha256=artifacts.sha256_file(str(pkl)))

    # the shipped table knows only NVlabs/edm's file: the stand-in EDM is "modified"
    m = imp(stock_pkl, "t0")
    assert m.source.network_source == "modified" and "NVlabs/edm@" in m.source.source_warnings[0]
    monkeypatch.setattr(edm_source, "KNOWN_LAYOUTS", {"fake-edm@1": fingerprints(networks_source())})
    m = imp(stock_pkl, "t1")
    assert (m.source.network_source, m.source.source_warnings) == ("fake-edm@1", [])
    m = imp(fork_pkl, "t2")                      # same shapes: imports, but says so
    assert m.source.network_source == "modified"
    [w] = m.source.source_warnings
    assert "changed: EDMPrecond" in w
    stored = (tmp_path / "t2" / "manifest.json").read_text()
    assert "changed: EDMPrecond" in stored and '"network_source":"modified"' in stored.replace(" ", "")

    from pipeline.cli import main
    from pipeline.teachers import registry
    sha = artifacts.sha256_file(str(fork_pkl))
    assert main(["teacher", "import-edm", str(fork_pkl), "--allow-pickle", "--sha256", sha,
                 "--out", str(tmp_path / "t3")]) == 0
    out, err = capsys.readouterr()
    assert "network source: modified" in out and "warning: the embedded network source differs" in err
    root = tmp_path / "root"
    assert main(["teacher", "register", str(fork_pkl), "--root", str(root), "--sha256", sha, "--no-event"]) == 0
    assert "warning: the embedded network source differs" in capsys.readouterr().err
    [rec] = registry.list_teachers(str(root))
    assert "WARNING: the embedded network source differs" in rec.source
