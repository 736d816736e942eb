"""PostgreSQL and Redis for the server tests: the machine runs them (CI and development machines start
PostgreSQL 15 on 127.0.0.1:5432 with trust authentication, and Redis on 127.0.0.1:6379, before the tests);
the tests start neither. Each test takes a PostgreSQL database (and a login role owning it) of its own,
dropped afterwards, and a Redis database number of its own, flushed afterwards.

``python tests/services.py`` checks both and prints one line per missing service (exit status 1);
scripts/test.sh runs it before the suite. ``KDM_TEST_PG_HOST`` / ``KDM_TEST_PG_PORT`` /
``KDM_TEST_REDIS_HOST`` / ``KDM_TEST_REDIS_PORT`` point elsewhere."""
from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from typing import Iterator, NamedTuple, Optional

PG_HOST = os.environ.get("KDM_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("KDM_TEST_PG_PORT", "5432"))
REDIS_HOST = os.environ.get("KDM_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("KDM_TEST_REDIS_PORT", "6379"))
# Trust authentication: the first of these that connects to the maintenance database administers the tests'.
PG_ADMINS = (("postgres", "postgres"), ("root", "root"), ("root", "postgres"))
PREFIX = "kdm_test_"
REDIS_CLAIM = "kdm:test:claim"


def pg_missing_line(why: str) -> str:
    return (f"PostgreSQL is missing on {PG_HOST}:{PG_PORT} ({why}): start PostgreSQL 15 there with trust "
            f"authentication (the server tests need it and never start it)")


def redis_missing_line(why: str) -> str:
    return (f"Redis is missing on {REDIS_HOST}:{REDIS_PORT} ({why}): start redis-server there (the "
            f"production-topology test needs it and never starts it)")


def _why(e: BaseException) -> str:
    if isinstance(e, ConnectionRefusedError) or "Connection refused" in str(e) or "Connect call failed" in str(e):
        return "connection refused"
    return f"{type(e).__name__}: {e}"


async def _admin_connection():
    import asyncpg
    errors = []
    for user, database in PG_ADMINS:
        try:
            return await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=user, database=database, timeout=5)
        except (OSError, asyncio.TimeoutError) as e:        # nothing listening: no other user will do better
            raise ConnectionError(_why(e)) from None
        except Exception as e:                               # e.g. no such role / database, password required
            errors.append(f"{user}@{database}: {e}")
    raise ConnectionError("; ".join(errors))


def pg_problem() -> Optional[str]:
    """None when an administrative connection to PostgreSQL works, else the one line that says what to start."""
    async def probe():
        conn = await _admin_connection()
        try:
            return await conn.fetchval("SHOW server_version")
        finally:
            await conn.close()
    try:
        asyncio.run(probe())
    except ConnectionError as e:
        return pg_missing_line(str(e))
    return None


def redis_problem() -> Optional[str]:
    """None when Redis answers PING, else the one line that says what to start."""
    import redis
    try:
        redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_connect_timeout=5, socket_timeout=5).ping()
    except Exception as e:
        return redis_missing_line(_why(e))
    return None


def require_postgres() -> None:
    """Fail (never skip) the calling test when PostgreSQL is absent: CI runs it, so a skip would hide a gap."""
    import pytest
    if (line := pg_problem()) is not None:
        pytest.fail(line, pytrace=False)


def require_redis() -> None:
    import pytest
    if (line := redis_problem()) is not None:
        pytest.fail(line, pytrace=False)


class Database(NamedTuple):
    name: str
    user: str
    password: str

    def url(self, driver: str = "postgresql+asyncpg") -> str:
        return f"{driver}://{self.user}:{self.password}@{PG_HOST}:{PG_PORT}/{self.name}"

    def query(self, sql: str, *args) -> list:
        """Rows of ``sql`` run in this database as its owner (to check what a Prefect server stored there)."""
        import asyncpg

        async def run():
            conn = await asyncpg.connect(self.url("postgresql"), timeout=10)
            try:
                return [tuple(r) for r in await conn.fetch(sql, *args)]
            finally:
                await conn.close()
        return asyncio.run(run())


async def _drop(conn, name: str) -> None:
    # WITH (FORCE) ends the sessions a killed server may have left behind (PostgreSQL 13+).
    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await conn.execute(f'DROP ROLE IF EXISTS "{name}"')


@contextlib.contextmanager
def postgres_database() -> Iterator[Database]:
    """A fresh database ``kdm_test_<random>`` owned by a login role of the same name with a password (the
    shape of compose's ``postgresql+asyncpg://USER:PASSWORD@postgres:5432/prefect``), both dropped afterwards."""
    require_postgres()
    db = Database(PREFIX + secrets.token_hex(6), "", secrets.token_hex(12))
    db = db._replace(user=db.name)

    async def create():
        conn = await _admin_connection()
        try:
            await conn.execute(f"CREATE ROLE \"{db.user}\" LOGIN PASSWORD '{db.password}'")
            await conn.execute(f'CREATE DATABASE "{db.name}" OWNER "{db.user}"')
        finally:
            await conn.close()

    async def drop():
        conn = await _admin_connection()
        try:
            await _drop(conn, db.name)
        finally:
            await conn.close()

    asyncio.run(create())
    try:
        yield db
    finally:
        asyncio.run(drop())


def postgres_databases() -> list[str]:
    """The names of the tests' databases that exist now (for the check that a test dropped its own)."""
    async def names():
        conn = await _admin_connection()
        try:
            return [r[0] for r in await conn.fetch("SELECT datname FROM pg_database WHERE datname LIKE $1",
                                                  PREFIX + "%")]
        finally:
            await conn.close()
    return asyncio.run(names())


@contextlib.contextmanager
def redis_database(ttl: int = 3 * 3600) -> Iterator[int]:
    """A Redis database number of this test's own: the first of 15..1 that is empty and whose claim key this
    test set (SET NX, so two test sessions on one Redis never share one); only that database is flushed
    afterwards. ``KDM_TEST_REDIS_DB`` names the number instead (it must be empty)."""
    import pytest
    import redis
    require_redis()
    token = secrets.token_hex(8)
    wanted = [int(os.environ["KDM_TEST_REDIS_DB"])] if os.environ.get("KDM_TEST_REDIS_DB") else range(15, 0, -1)
    for n in wanted:
        r = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=n, socket_timeout=10)
        try:
            if r.dbsize() == 0 and r.set(REDIS_CLAIM, token, nx=True, ex=ttl) and r.dbsize() == 1:
                break
        except redis.ResponseError:          # beyond the server's `databases` setting
            continue
        if r.get(REDIS_CLAIM) == token.encode():
            r.delete(REDIS_CLAIM)
    else:
        pytest.fail(f"no empty Redis database among {list(wanted)} on {REDIS_HOST}:{REDIS_PORT} for the test "
                    f"(set KDM_TEST_REDIS_DB to an empty one)", pytrace=False)
    try:
        yield n
    finally:
        if r.get(REDIS_CLAIM) == token.encode():      # still ours: flush what the test left there
            r.flushdb()


if __name__ == "__main__":
    import sys
    problems = [p for p in (pg_problem(), redis_problem()) if p]
    for p in problems:
        print(p, file=sys.stderr)
    sys.exit(1 if problems else 0)
