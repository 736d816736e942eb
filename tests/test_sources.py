"""Datasets by name (pipeline/data/sources.py): explicit archive, then $KDM_DATA_DIR, then a download (from a
local file:// or http.server URL here, never the internet); the offline line; CIFAR-10's python release."""
import functools
import hashlib
import http.server
import io
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import sources
from pipeline.data.datasets import open_image_dataset, prepare_image_dataset, source_text
from pipeline.errors import KDMError
from shared_data import REPO, require, shared_data

JPEG = shared_data("cifar10-jpeg.tar.gz")


@pytest.fixture
def empty_data_dir(tmp_path, monkeypatch):
    d = tmp_path / "data"
    monkeypatch.setenv("KDM_DATA_DIR", str(d))
    monkeypatch.delenv("KDM_DATA_MIRROR", raising=False)
    return d


@pytest.fixture
def http_dir(tmp_path):
    """A local http.server serving tmp_path/'served' (the stand-in for a download site)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_the_shared_folder_is_found_by_name():
    """conftest points KDM_DATA_DIR at the shared data folder: cifar10 resolves to the JPEG mirror, verified."""
    require(JPEG)
    r = sources.resolve("cifar10")
    assert (Path(r.archive), r.source, r.how) == (JPEG.resolve(), sources.CIFAR10_JPEG, "found")


def test_an_explicit_archive_comes_first(tmp_path):
    r = sources.resolve("cifar10", str(tmp_path / "mine.tar.gz"))
    assert (r.archive, r.source, r.how) == (str(tmp_path / "mine.tar.gz"), None, "given")


def test_the_official_release_is_preferred_in_the_data_dir(empty_data_dir, monkeypatch):
    empty_data_dir.mkdir()
    (empty_data_dir / "cifar10-jpeg.tar.gz").write_bytes(b"jpeg")
    (empty_data_dir / "cifar-10-python.tar.gz").write_bytes(b"python")
    monkeypatch.setattr(sources, "KNOWN_SOURCES", {"cifar10": (
        _fake(sources.CIFAR10_PYTHON, b"python"), _fake(sources.CIFAR10_JPEG, b"jpeg"))})
    r = sources.resolve("cifar10")
    assert (Path(r.archive).name, r.source.id) == ("cifar-10-python.tar.gz", "cifar10-python")


def test_a_damaged_file_in_the_data_dir_is_refused(empty_data_dir):
    empty_data_dir.mkdir()
    (empty_data_dir / "cifar-10-python.tar.gz").write_bytes(b"not the release")
    md5 = hashlib.md5(b"not the release").hexdigest()
    with pytest.raises(KDMError, match=rf"^{empty_data_dir}/cifar-10-python.tar.gz has md5 {md5}, not the published "
                                       rf"md5 c58f30108f718f92721af3b95e74349a of cifar-10-python.tar.gz: .*delete it"):
        sources.resolve("cifar10")


def _missing_line(d: Path) -> str:
    return (f"fetch cifar-10-python.tar.gz (md5 c58f30108f718f92721af3b95e74349a) from "
            f"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz on a machine with access and put it at "
            f"{d}/cifar-10-python.tar.gz (or cifar10-jpeg.tar.gz, sha256 "
            f"d877bdec11f54282b92da36e9f045bd305d663b1223e3822baff39ca9ff6690a, at {d}/cifar10-jpeg.tar.gz)")


def test_offline_and_absent_is_one_line_naming_file_checksum_url_and_path(empty_data_dir):
    with pytest.raises(KDMError) as e:
        sources.resolve("cifar10")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"dataset cifar10 is not in {empty_data_dir} and KDM_OFFLINE forbids a download: ")
    assert _missing_line(empty_data_dir) in msg
    assert not empty_data_dir.exists()              # nothing was created


def test_an_unreachable_url_gives_the_same_line_with_the_reason(empty_data_dir, monkeypatch):
    monkeypatch.setenv("KDM_OFFLINE", "0")
    monkeypatch.setenv("KDM_DATA_MIRROR", "http://127.0.0.1:9")       # discard port: connection refused
    with pytest.raises(KDMError) as e:
        sources.resolve("cifar10", progress=False, log=lambda m: None)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"dataset cifar10 is not in {empty_data_dir} and cannot be downloaded "
                          f"(http://127.0.0.1:9/cifar-10-python.tar.gz: URLError: ")
    assert _missing_line(empty_data_dir) in msg           # the official URL, to fetch it elsewhere
    assert [p.name for p in empty_data_dir.iterdir()] == []          # no temporary file left


def _fake(source, data: bytes):
    """``source`` with the checksum of ``data`` (the download machinery under test, not the published file)."""
    import dataclasses
    return dataclasses.replace(source, digest=hashlib.new(source.algorithm, data).hexdigest())


def test_download_over_http_progress_temporary_name_checksum_rename(empty_data_dir, http_dir):
    served, url = http_dir
    data = os.urandom(3 << 20)
    (served / "cifar-10-python.tar.gz").write_bytes(data)
    src = _fake(sources.CIFAR10_PYTHON, data)
    seen, logs = [], []
    real_open = open

    def spy_open(path, *a, **k):            # the bytes go to a temporary name in the data dir, never the final one
        seen.append(Path(path).name)
        return real_open(path, *a, **k)
    import builtins
    builtins.open, saved = spy_open, builtins.open
    try:
        p = sources.download(src, empty_data_dir, f"{url}/cifar-10-python.tar.gz", progress=True, log=logs.append)
    finally:
        builtins.open = saved
    assert p == empty_data_dir / "cifar-10-python.tar.gz" and p.read_bytes() == data
    assert seen and seen[0].startswith(".cifar-10-python.tar.gz.") and seen[0].endswith(".download")
    assert sorted(x.name for x in empty_data_dir.iterdir()) == ["cifar-10-python.tar.gz"]
    assert logs == [f"downloading {url}/cifar-10-python.tar.gz -> {p}", f"downloaded {p} (md5 {src.digest} verified)"]
    # without a progress bar (a worker's log) a line every 10 %
    logs = []
    sources.download(src, empty_data_dir / "again", f"{url}/cifar-10-python.tar.gz", progress=False, log=logs.append)
    assert logs[1:-1] == [f"cifar-10-python.tar.gz: {k:.1f} of 3.0 MiB ({int(100 * k / 3)} %)" for k in (1.0, 2.0, 3.0)]


def test_a_checksum_mismatch_keeps_nothing(empty_data_dir, http_dir, monkeypatch):
    served, url = http_dir
    (served / "cifar-10-python.tar.gz").write_bytes(b"an html error page, not the archive")
    monkeypatch.setenv("KDM_OFFLINE", "0")
    monkeypatch.setenv("KDM_DATA_MIRROR", url)
    md5 = hashlib.md5(b"an html error page, not the archive").hexdigest()
    with pytest.raises(KDMError, match=rf"^the download of cifar-10-python.tar.gz from {url}/cifar-10-python.tar.gz "
                                       rf"has md5 {md5}, not the published md5 c58f30108f718f92721af3b95e74349a: "
                                       rf"nothing was kept; .* put it at {empty_data_dir}/cifar-10-python.tar.gz$"):
        sources.resolve("cifar10", progress=False, log=lambda m: None)
    assert list(empty_data_dir.iterdir()) == []


def test_resolve_downloads_from_a_file_url_mirror(empty_data_dir, tmp_path, monkeypatch):
    """KDM_DATA_MIRROR=file://...: the official file is not there (skipped with its reason), the JPEG tar is
    downloaded, verified against its published sha256, and found again afterwards without a download."""
    require(JPEG)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    shutil.copy(JPEG, mirror / "cifar10-jpeg.tar.gz")
    monkeypatch.setenv("KDM_OFFLINE", "0")
    monkeypatch.setenv("KDM_DATA_MIRROR", mirror.as_uri())
    logs = []
    r = sources.resolve("cifar10", progress=False, log=logs.append)
    assert (r.archive, r.source.id, r.how) == (str(empty_data_dir / "cifar10-jpeg.tar.gz"), "cifar10-jpeg-mirror",
                                               "downloaded")
    assert logs[-1].endswith(f"(sha256 {sources.CIFAR10_JPEG.digest} verified)")
    monkeypatch.setenv("KDM_OFFLINE", "1")
    assert sources.resolve("cifar10").how == "found"


# --- CIFAR-10's python release --------------------------------------------------------------------------

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class Py2Pickler(pickle._Pickler):
    """Pickles as Python 2's cPickle wrote the release: str and bytes as py2 ``str`` (BINSTRING), numpy's
    globals under ``numpy.core.multiarray``; read back with ``encoding='latin1'``."""

    def save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        self.write(pickle.BINSTRING + len(data).to_bytes(4, "little") + data)
        self.memoize(obj)

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", "")
        if module.startswith("numpy._core"):
            name = name or obj.__qualname__
            module = module.replace("numpy._core", "numpy.core", 1)
            self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str


def py2_dumps(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def python_release(path: Path, per_batch: int = 6, seed: int = 0, names=NAMES, extra: dict | None = None):
    """A miniature cifar-10-python.tar.gz (the release's layout, pickled as Python 2 did, ``per_batch`` images
    a batch); returns (path, {batch: (data (n, 3072) uint8, labels)})."""
    rng = np.random.default_rng(seed)
    batches = {}
    with tarfile.open(path, "w:gz") as tar:
        def add(name, obj):
            raw = extra.get(name, None) if extra else None
            raw = raw if raw is not None else py2_dumps(obj)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
        d = tarfile.TarInfo("cifar-10-batches-py")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        add("batches.meta", {"label_names": list(names), "num_cases_per_batch": per_batch})
        for b in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
            labels = rng.integers(0, len(names), per_batch).tolist()
            batches[b] = (data, labels)
            add(b, {"batch_label": b, "labels": labels, "data": data,
                    "filenames": [f"img_{k}.png" for k in range(per_batch)]})
        add("readme.html", "<html></html>")
    return path, batches


def test_the_python_release_becomes_the_same_layout(tmp_path):
    archive, batches = python_release(tmp_path / "cifar-10-python.tar.gz")
    m = prepare_image_dataset(str(archive), str(tmp_path / "ds"), chunk_size=7, progress=False)
    assert m.class_names == tuple(NAMES) and m.image_shape == (3, 32, 32)
    ds = open_image_dataset(str(tmp_path / "ds"))
    ds.verify()
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        data = np.concatenate([batches[b][0] for b in names])
        labels = np.concatenate([batches[b][1] for b in names])
        order = np.argsort(labels, kind="stable")           # class by class, the batches' order within a class
        images, got = ds.load(split)
        assert got.tolist() == labels[order].tolist()
        # the release's rows are the R, G, B planes of 32x32, row-major: (C, H, W) as stored
        assert np.array_equal(images, data[order].reshape(-1, 3, 32, 32))
        assert m.splits[split].label_histogram == tuple(np.bincount(labels, minlength=10).tolist())
    assert m.source.id == "archive" and m.source.format == "cifar10-python"   # not the published file
    assert "not a known published file" in source_text(m)


def test_class_names_map_to_their_sorted_index(tmp_path):
    names = ["zebra", "ant", "moth"]
    archive, batches = python_release(tmp_path / "c.tar.gz", per_batch=4, names=names)
    m = prepare_image_dataset(str(archive), str(tmp_path / "ds"), progress=False)
    assert m.class_names == ("ant", "moth", "zebra")
    images, labels = open_image_dataset(str(tmp_path / "ds")).load("test")
    data, raw = batches["test_batch"]
    to_sorted = {0: 2, 1: 0, 2: 1}
    want = sorted(range(4), key=lambda k: to_sorted[raw[k]])
    assert labels.tolist() == [to_sorted[raw[k]] for k in want]
    assert np.array_equal(images, data[want].reshape(-1, 3, 32, 32))


def test_a_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    archive, _ = python_release(tmp_path / "c.tar.gz", extra={"data_batch_2": pickle.dumps({"data": Evil()})})
    with pytest.raises(KDMError, match=r"data_batch_2 is not a CIFAR-10 python batch \(global (posix|os)\.system is "
                                       r"not allowed in a CIFAR-10 batch\)"):
        prepare_image_dataset(str(archive), str(tmp_path / "ds"), progress=False)
    assert not (tmp_path / "ds").exists()


def test_an_incomplete_release_names_what_is_missing(tmp_path):
    path = tmp_path / "c.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        raw = pickle.dumps({"label_names": NAMES})
        info = tarfile.TarInfo("cifar-10-batches-py/batches.meta")
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
    with pytest.raises(KDMError, match=r"lacks cifar-10-batches-py/\{data_batch_1,data_batch_2,data_batch_3,"
                                       r"data_batch_4,data_batch_5,test_batch\}: it is not a complete CIFAR-10 python "
                                       r"release"):
        prepare_image_dataset(str(path), str(tmp_path / "ds"), progress=False)


def test_known_files_are_recorded_by_their_checksum():
    official = sources.source_record("x/cifar-10-python.tar.gz", "cifar10-python", "a" * 64,
                                     "c58f30108f718f92721af3b95e74349a")
    assert (official.id, official.checksum, official.url) == (
        "cifar10-python", "md5:c58f30108f718f92721af3b95e74349a",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz")
    mirror = sources.source_record("renamed.tgz", "image-folder", sources.CIFAR10_JPEG.digest, "0" * 32)
    assert mirror.id == "cifar10-jpeg-mirror" and mirror.file == "cifar10-jpeg.tar.gz"
    assert "pixels differ from the official release" in mirror.text()


# --- the commands, offline and absent: one line, non-zero, nothing written --------------------------------

def _kdm(*args, env):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **env}, timeout=300)


@pytest.mark.parametrize("cmd", [("distill", "--recipe", "cifar10", "--preset", "smoke", "--root", "{root}"),
                                 ("dataset", "prepare", "--out", "{root}/ds")])
def test_commands_offline_and_absent(tmp_path, cmd):
    d = tmp_path / "data"
    root = tmp_path / "root"
    r = _kdm(*[c.format(root=root) for c in cmd], env={"KDM_DATA_DIR": str(d), "KDM_OFFLINE": "1"})
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith(f"kdm {cmd[0]}: error: dataset cifar10 is not in {d} and KDM_OFFLINE forbids a "
                               f"download: ")
    assert _missing_line(d) in lines[0]
    assert not root.exists() and not d.exists()          # no stage ran


def test_the_dry_run_plans_the_download(tmp_path):
    r = _kdm("distill", "--recipe", "cifar10", "--preset", "smoke", "--root", str(tmp_path / "root"), "--dry-run",
             env={"KDM_DATA_DIR": str(tmp_path / "data"), "KDM_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert "dataset     to do    kdm-cpu  (known after the dataset download stage)" in r.stdout
    assert not (tmp_path / "data").exists()


def test_presets_name_data_files_in_the_data_dir(tmp_path, monkeypatch):
    """configs/distill/checkerboard-import.yaml reads $KDM_DATA_DIR/checkerboard-fm-trajectories.npy: no
    product default points into ../shared; absent, the dry run says where to put the file."""
    from pipeline import stages
    monkeypatch.setenv("KDM_DATA_DIR", str(tmp_path / "d"))
    assert stages.resolve_local("$KDM_DATA_DIR/x.npy", "/elsewhere") == str(tmp_path / "d" / "x.npy")
    assert stages.resolve_local("${KDM_DATA_DIR}/x.npy", "/elsewhere") == str(tmp_path / "d" / "x.npy")
    assert stages.resolve_local("x.npy", "/elsewhere") == "/elsewhere/x.npy"
    assert "shared" not in (REPO / "configs" / "distill" / "checkerboard-import.yaml").read_text()
    r = _kdm("distill", "--recipe", "checkerboard", "--preset", "checkerboard-import", "--root", str(tmp_path / "r"),
             "--dry-run", env={"KDM_DATA_DIR": str(tmp_path / "d")})
    assert r.returncode == 1 and r.stderr.strip() == (
        f"kdm distill: error: import_uri {tmp_path / 'd' / 'checkerboard-fm-trajectories.npy'} does not exist: put "
        f"the file there (the checkerboard-import preset reads the official KDM trajectories "
        f"checkerboard-fm-trajectories.npy from $KDM_DATA_DIR, default ~/.cache/kdm/data) or set import_uri to its path")
    require(shared_data("checkerboard-fm-trajectories.npy"))
    r = _kdm("distill", "--recipe", "checkerboard", "--preset", "checkerboard-import", "--root", str(tmp_path / "r"),
             "--dry-run", env={"KDM_DATA_DIR": str(shared_data("checkerboard-fm-trajectories.npy").parent)})
    assert r.returncode == 0 and "pairs       to do    kdm-cpu  " in r.stdout, r.stderr
