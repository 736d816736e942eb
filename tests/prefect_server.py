"""A real ``prefect server start`` for tests that need one: a free 127.0.0.1 port, its own PREFECT_HOME,
stopped with its process group at the end, and processes started against it.

``prefect_server`` runs it on SQLite (``make demo``'s setting) unless its settings name another database;
``production_server``, what the server tests use, runs it as
docker/compose.yaml's ``prefect-server`` service is configured (its environment read from that file: the
PostgreSQL connection URL, the auth string, CSRF protection, no analytics) on a PostgreSQL database of its
own (tests/services.py), and gives clients the workers' settings of the same file."""
from __future__ import annotations

import base64
import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import NamedTuple, Optional

import httpx
import pytest
import yaml

from s3_server import free_port
from services import PG_HOST, PG_PORT, Database, postgres_database

PREFECT = str(Path(sys.executable).parent / "prefect")
REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker" / "compose.yaml"
# compose's substitutions: ${NAME:?message} (required) and ${NAME:-default}
SUBST = re.compile(r"\$\{([A-Za-z0-9_]+)(?::([?-])([^}]*))?\}")
COMPOSE_DATABASE = "@postgres:5432/prefect"      # compose's database host and name, replaced by the test's own


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
def prefect_server(home: Path, ui: bool = False, port: Optional[int] = None, **settings: str):
    """Yield (base URL, environment for processes that talk to it); ``settings`` are extra environment
    variables of the server (and of that environment); ``ui`` serves the UI from its own static directory
    under ``home``. PREFECT_API_URL is set in the yielded environment."""
    port = port or free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home / "home"), PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(port),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    if ui:
        env.update(PREFECT_UI_ENABLED="true", PREFECT_UI_API_URL=f"{base}/api",
                   PREFECT_UI_STATIC_DIRECTORY=str(home / "ui"))
    env.update(settings)
    log = home / f"server-{port}.log"
    proc = start([PREFECT, "server", "start"], env, log)
    try:
        wait_healthy(proc, base, log)
        yield base, env | {"PREFECT_API_URL": f"{base}/api"}
    finally:
        stop(proc)


def wait_healthy(proc: subprocess.Popen, base: str, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"prefect server start exited with {proc.returncode}:\n{tail(log)}")
        try:
            if httpx.get(f"{base}/api/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"the Prefect server on {base} did not answer /api/health within {timeout:.0f} s:\n{tail(log)}")
        time.sleep(0.5)


# --- docker/compose.yaml's configuration ---------------------------------------------------------------

def _substitute(value, values: dict) -> str:
    def one(m: re.Match) -> str:
        name, kind, rest = m.groups()
        if values.get(name):
            return values[name]
        if kind == "-":
            return rest
        raise KeyError(f"docker/compose.yaml needs {name} ({rest or 'required'}); the test gives no value for it")
    return SUBST.sub(one, str(value))


def compose_environment(where: str, values: dict) -> dict:
    """The environment of a compose service (``services.<name>``) or of a top-level extension block
    (``x-worker-env``) of docker/compose.yaml, its ``${...}`` substitutions filled from ``values``."""
    doc = yaml.safe_load(COMPOSE.read_text())
    env = doc[where] if where.startswith("x-") else doc["services"][where]["environment"]
    return {k: _substitute(v, values) for k, v in env.items()}


def compose_server_settings(db: Database, auth: str, ui_api_url: str) -> dict:
    """``prefect-server``'s environment in docker/compose.yaml for a server of this machine: the database
    host and name are the test's own (compose: ``postgres:5432/prefect``), the rest as written there."""
    env = compose_environment("prefect-server", {"POSTGRES_USER": db.user, "POSTGRES_PASSWORD": db.password,
                                                 "PREFECT_AUTH_STRING": auth, "PREFECT_UI_API_URL": ui_api_url})
    url = env["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert url.startswith("postgresql+asyncpg://") and url.endswith(COMPOSE_DATABASE), \
        f"docker/compose.yaml's connection URL has changed shape ({re.sub(r'//[^@]*@', '//...@', url)}): " \
        "update tests/prefect_server.py"
    env["PREFECT_API_DATABASE_CONNECTION_URL"] = url.removesuffix(COMPOSE_DATABASE) + f"@{PG_HOST}:{PG_PORT}/{db.name}"
    return env


def compose_client_settings(auth: str) -> dict:
    """The Prefect client settings compose gives the workers (``x-worker-env``): the auth string, CSRF support."""
    env = compose_environment("x-worker-env", {"PREFECT_AUTH_STRING": auth, "KDM_S3_ACCESS_KEY": "-",
                                               "KDM_S3_SECRET_KEY": "-"})
    return {k: v for k, v in env.items() if k.startswith("PREFECT_") and k != "PREFECT_API_URL"}


class Server(NamedTuple):
    base: str            # http://127.0.0.1:PORT
    env: dict            # a client's environment: PREFECT_API_URL, the auth string, no server settings
    auth: str
    database: Database
    home: Path

    @property
    def api(self) -> "Api":
        return Api(self.base, self.auth)


@contextlib.contextmanager
def production_server(home: Path, ui: bool = False, auth: Optional[str] = None, **settings: str):
    """``prefect server start`` configured as docker/compose.yaml's ``prefect-server`` on a PostgreSQL
    database of its own (dropped afterwards); ``settings`` are extra server settings (e.g. the scheduler
    off). Yields a ``Server``; its ``env`` is a client's (compose's worker settings, server settings removed)."""
    auth = auth or f"kdm-admin:{secrets.token_hex(24)}"
    with postgres_database() as db:
        port = free_port()
        server = compose_server_settings(db, auth, f"http://127.0.0.1:{port}/api")
        with prefect_server(home, ui=ui, port=port, **server, **settings) as (base, env):
            client = {k: v for k, v in env.items() if k not in server} | compose_client_settings(auth)
            yield Server(base, client, auth, db, home)


@contextlib.contextmanager
def production_harness(home: Path, **settings: str):
    """``prefect_test_harness`` on a ``production_server``: this process's Prefect client (flows called
    here, ``get_client``, events, logs) talks to it with its auth string. Yields the ``Server``."""
    import inspect

    import prefect.context
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain():
        try:
            result = APILogWorker.instance().drain()
            if inspect.isawaitable(result):
                await result
        except RuntimeError:
            pass
        result = EventsWorker.drain_all()
        if inspect.isawaitable(result):
            await result

    with production_server(home, **settings) as srv:
        with temporary_settings(updates={PREFECT_API_URL: f"{srv.base}/api", PREFECT_API_AUTH_STRING: srv.auth}):
            with prefect.context._temporary_global_settings_context(prefect.context.get_settings_context()):
                try:
                    yield srv
                finally:
                    run_coro_as_sync(drain())      # nothing left for a server that is about to stop


def basic(auth: str) -> str:
    return "Basic " + base64.b64encode(auth.encode()).decode()


class Api:
    """HTTP calls to a Prefect API. ``call`` sends exactly the credentials it is given (``auth`` None: no
    Authorization header; ``csrf`` a (client, token) pair or None); ``get``/``post``/``ok`` send the auth
    string and, for state-changing methods, a CSRF token, and fail the test on an error status."""

    def __init__(self, base: str, auth: Optional[str] = None):
        self.api = f"{base.removesuffix('/api')}/api"
        self.auth = auth
        self._token: Optional[tuple[str, str]] = None

    def call(self, method: str, path: str, body=None, auth=None, csrf=None, timeout: float = 30) -> httpx.Response:
        headers = {}
        if auth is not None:
            headers["Authorization"] = basic(auth)
        if csrf is not None:
            headers.update({"Prefect-Csrf-Client": csrf[0], "Prefect-Csrf-Token": csrf[1]})
        return httpx.request(method, self.api + path, json=body, headers=headers, timeout=timeout)

    def csrf(self) -> tuple[str, str]:
        client = str(uuid.uuid4())
        r = self.call("GET", f"/csrf-token?client={client}", auth=self.auth)
        assert r.status_code == 200, r.text
        return client, r.json()["token"]

    def request(self, method: str, path: str, body=None) -> httpx.Response:
        """With this API's credentials; retried on 429/503 (SQLite under concurrent writes answers 503 at
        times; Prefect's client retries too) and once with a fresh CSRF token on an invalid one."""
        for attempt in range(5):
            csrf = None
            if self.auth is not None and method != "GET":
                self._token = self._token or self.csrf()
                csrf = self._token
            r = self.call(method, path, body, auth=self.auth, csrf=csrf)
            if r.status_code == 403 and "CSRF" in r.text:
                self._token = None
            elif r.status_code not in (429, 503):
                return r
            time.sleep(1 + attempt)
        return r

    def ok(self, method: str, path: str, body=None):
        r = self.request(method, path, body)
        assert r.status_code < 300, f"{method} {path}: {r.status_code} {r.text}"
        return r.json() if r.content else None

    def get(self, path: str):
        return self.ok("GET", path)

    def post(self, path: str, body=None):
        return self.ok("POST", path, body)
