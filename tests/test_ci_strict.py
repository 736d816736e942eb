"""Under CI=true a skipped test fails unless it is marked ``gpu`` and skips for want (or presence) of a GPU,
and an xfail (or its unexpected pass) fails (tests/conftest.py); elsewhere they skip / xfail."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

PROBE = '''
import pytest

def test_skips():
    pytest.skip("a missing piece")

@pytest.mark.skipif(True, reason="not installed")
def test_skipif():
    pass

@pytest.mark.gpu
@pytest.mark.skipif(True, reason="needs a CUDA device")
def test_gpu():
    pass

@pytest.mark.gpu
def test_gpu_skips_for_another_reason():
    pytest.skip("the LPIPS weights are missing")

@pytest.mark.xfail(reason="a known bug")
def test_xfail():
    assert False

@pytest.mark.xfail(reason="a fixed bug")
def test_xpass():
    pass

def test_passes():
    pass
'''

IMPORT_PROBE = '''
import pytest
pytest.importorskip("no_such_module_kdm")

def test_never_collected():
    pass
'''


def pytest_in(tmp: Path, ci: str | None, *files: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": ci} if ci is not None else {})
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *files], cwd=tmp,
                          env=env, capture_output=True, text=True, timeout=120)


def test_a_skip_fails_under_ci_unless_the_test_is_marked_gpu(tmp_path):
    for name in ("conftest.py", "shared_data.py"):
        shutil.copy(Path(__file__).with_name(name), tmp_path / name)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_probe.py").write_text(PROBE)
    (tmp_path / "test_import_probe.py").write_text(IMPORT_PROBE)

    local = pytest_in(tmp_path, None, "test_probe.py", "test_import_probe.py")
    assert local.returncode == 0, local.stdout
    assert "1 passed, 5 skipped, 1 xfailed, 1 xpassed" in local.stdout     # the import probe skips as a module

    ci = pytest_in(tmp_path, "true", "test_probe.py")
    assert ci.returncode == 1, ci.stdout
    assert "4 failed, 1 passed, 1 skipped, 1 error" in ci.stdout
    for name, reason in (("test_skips", "a missing piece"), ("test_skipif", "not installed"),
                         ("test_gpu_skips_for_another_reason", "the LPIPS weights are missing")):
        assert f"test_probe.py::{name} skipped under CI=true (Skipped: {reason}); only tests marked 'gpu'" in ci.stdout
    assert "test_probe.py::test_xfail xfailed under CI=true (a known bug); an expected failure is a known gap" \
        in ci.stdout
    assert "test_probe.py::test_xpass passed although marked xfail under CI=true (a fixed bug)" in ci.stdout
    assert "SKIPPED [1] test_probe.py:11: needs a CUDA device" in ci.stdout      # the gpu test may skip

    ci = pytest_in(tmp_path, "true", "test_import_probe.py")
    assert ci.returncode != 0 and "test_import_probe.py skipped under CI=true" in ci.stdout
    assert "no_such_module_kdm" in ci.stdout
