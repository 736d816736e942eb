"""The server tests' plumbing (tests/services.py, tests/prefect_server.py): a PostgreSQL database and a Redis
database number of each test's own, removed afterwards; the server settings taken from docker/compose.yaml;
one line per missing service, saying what to start."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import redis

import services
from prefect_server import compose_client_settings, compose_server_settings

REPO = Path(__file__).resolve().parents[1]


def test_each_test_gets_a_postgres_database_and_role_of_its_own_dropped_afterwards():
    with services.postgres_database() as a, services.postgres_database() as b:
        assert a.name != b.name and a.name.startswith("kdm_test_") and a.user == a.name
        a.query("CREATE TABLE t (x int)")
        a.query("INSERT INTO t VALUES (1)")
        assert a.query("SELECT x FROM t") == [(1,)]
        assert b.query("SELECT count(*) FROM pg_tables WHERE tablename = 't'") == [(0,)]
        assert {a.name, b.name} <= set(services.postgres_databases())
        assert a.query("SELECT current_user, current_database()") == [(a.name, a.name)]
    assert not {a.name, b.name} & set(services.postgres_databases())
    with services.postgres_database() as c:      # the roles went with them
        assert c.query("SELECT count(*) FROM pg_roles WHERE rolname IN ($1, $2)", a.name, b.name) == [(0,)]


def test_each_test_gets_a_redis_database_of_its_own_and_only_that_one_is_flushed():
    with services.redis_database() as outer:
        r_outer = redis.Redis(host=services.REDIS_HOST, port=services.REDIS_PORT, db=outer)
        r_outer.set("kdm:test:outer", "1")
        with services.redis_database() as inner:
            assert inner != outer
            r_inner = redis.Redis(host=services.REDIS_HOST, port=services.REDIS_PORT, db=inner)
            r_inner.set("kdm:test:inner", "1")
        assert r_inner.dbsize() == 0
        assert r_outer.get("kdm:test:outer") == b"1"
    assert r_outer.dbsize() == 0


def test_the_server_settings_are_compose_s_on_the_tests_database():
    db = services.Database("kdm_test_x", "kdm_test_x", "pw")
    env = compose_server_settings(db, "kdm-admin:secret", "http://127.0.0.1:1234/api")
    assert env["PREFECT_API_DATABASE_CONNECTION_URL"] == \
        f"postgresql+asyncpg://kdm_test_x:pw@{services.PG_HOST}:{services.PG_PORT}/kdm_test_x"
    assert env["PREFECT_SERVER_API_AUTH_STRING"] == "kdm-admin:secret"
    assert env["PREFECT_SERVER_CSRF_PROTECTION_ENABLED"] == "true"
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert env["PREFECT_UI_API_URL"] == "http://127.0.0.1:1234/api"
    assert compose_client_settings("kdm-admin:secret") == {"PREFECT_API_AUTH_STRING": "kdm-admin:secret",
                                                           "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED": "true"}


def test_a_missing_service_is_one_line_saying_what_to_start():
    from s3_server import free_port
    env = dict(os.environ, KDM_TEST_PG_PORT=str(free_port()), KDM_TEST_REDIS_PORT=str(free_port()))
    res = subprocess.run([sys.executable, "tests/services.py"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 1 and res.stdout == ""
    pg, rd = res.stderr.splitlines()
    assert pg.startswith(f"PostgreSQL is missing on {services.PG_HOST}:{env['KDM_TEST_PG_PORT']} "
                         "(connection refused): start PostgreSQL 15 there"), pg
    assert rd.startswith(f"Redis is missing on {services.REDIS_HOST}:{env['KDM_TEST_REDIS_PORT']} "
                         "(connection refused): start redis-server there"), rd
    ok = subprocess.run([sys.executable, "tests/services.py"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert (ok.returncode, ok.stderr) == (0, "")       # this machine runs both
