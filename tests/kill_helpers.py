"""Killing a child process at a chosen point, for the kill-and-resume tests."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Callable

import pytest


def sigkill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float, what: str) -> None:
    """SIGKILL ``proc`` as soon as ``ready()``; fail the test if it exits first or ``timeout`` seconds pass."""
    try:
        deadline = time.time() + timeout
        while not ready():
            if proc.poll() is not None:
                err = proc.stderr.read() if proc.stderr else ""
                err = err.decode() if isinstance(err, bytes) else err
                pytest.fail(f"{what} exited early ({proc.returncode}): {err[-2000:]}")
            if time.time() > deadline:
                pytest.fail(f"{what} did not get there within {timeout:.0f} s")
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
