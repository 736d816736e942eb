"""A real ``prefect server start`` for tests that need one: a free 127.0.0.1 port, its own PREFECT_HOME
(SQLite), stopped with its process group at the end, and processes started against it."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from s3_server import free_port

PREFECT = str(Path(sys.executable).parent / "prefect")


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM to the process group of ``proc`` (started with start_new_session), SIGKILL if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start(args: list[str], env: dict, log: Path, cwd: Path | None = None) -> subprocess.Popen:
    """A background process in its own session, stdout and stderr to ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


@contextlib.contextmanager
def prefect_server(home: Path, ui: bool = False, **settings: str):
    """Yield (base URL, environment for processes that talk to it); ``settings`` are extra environment
    variables of the server (and of that environment); ``ui`` serves the UI from its own static directory
    under ``home``. PREFECT_API_URL is set in the yielded environment."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home / "home"), PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(port),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    if ui:
        env.update(PREFECT_UI_ENABLED="true", PREFECT_UI_API_URL=f"{base}/api",
                   PREFECT_UI_STATIC_DIRECTORY=str(home / "ui"))
    env.update(settings)
    log = home / "server.log"
    proc = start([PREFECT, "server", "start"], env, log)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prefect server start exited with {proc.returncode}:\n{tail(log)}")
            try:
                if httpx.get(f"{base}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the Prefect server on {base} did not answer /api/health within 120 s:\n{tail(log)}")
            time.sleep(0.5)
        yield base, env | {"PREFECT_API_URL": f"{base}/api"}
    finally:
        stop(proc)
