"""The throwaway PostgreSQL server of the tests (tests/pgserver.py, conftest's
``pg_server`` and ``pg_url``)."""

from __future__ import annotations

import re

import asyncpg
import pytest

from .pgserver import PgServer

pytestmark = pytest.mark.postgres


async def test_the_session_server_answers_on_loopback_only(pg_server: PgServer) -> None:
    conn = await asyncpg.connect(pg_server.url(), timeout=10)
    try:
        version = await conn.fetchval("SELECT version()")
        listen = await conn.fetchval("SHOW listen_addresses")
    finally:
        await conn.close()
    assert version.startswith("PostgreSQL ")
    assert listen == "127.0.0.1"
    assert pg_server.url("x") == f"postgresql://postgres@127.0.0.1:{pg_server.port}/x"


async def test_each_database_is_fresh_distinct_and_writable(
        pg_server: PgServer, pg_url: str) -> None:
    assert re.fullmatch(r"postgresql://postgres@127\.0\.0\.1:\d+/t_[0-9a-f]{12}", pg_url)
    other_url = pg_server.create_database("t_other_of_" + pg_url.rsplit("/", 1)[1])
    first = await asyncpg.connect(pg_url, timeout=10)
    second = await asyncpg.connect(other_url, timeout=10)
    try:
        names = [await c.fetchval("SELECT current_database()") for c in (first, second)]
        assert names[0] != names[1]
        for conn, value in ((first, "one"), (second, "two")):
            assert await conn.fetchval(  # fresh: nothing of an earlier test's
                "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0
            await conn.execute("CREATE TABLE t (v text)")
            await conn.execute("INSERT INTO t VALUES ($1)", value)
        assert await first.fetch("SELECT v FROM t") == [("one",)]
        assert await second.fetch("SELECT v FROM t") == [("two",)]
    finally:
        await first.close()
        await second.close()
