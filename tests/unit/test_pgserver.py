"""The PostgreSQL test fixtures themselves (tests/pgserver.py, conftest's postgres and pg_dsn): the
server answers on 127.0.0.1 at its port and on no other address, each test's database is its own,
and a stopped (or killed) server is unreachable until started again, with its data kept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pgserver
import pytest


def connect(dsn: str) -> Any:
    import psycopg  # here, not at import: the fixture skips (or fails under CI) when it is missing

    return psycopg.connect(dsn, autocommit=True, connect_timeout=5)


def one(dsn: str, sql: str) -> Any:
    with connect(dsn) as conn:
        return conn.execute(sql).fetchone()[0]


def test_answers_select_1_on_loopback_at_its_port(postgres: pgserver.PgServer) -> None:
    assert postgres.dsn().startswith(f"postgresql://greenmail@127.0.0.1:{postgres.port}/")
    with connect(postgres.dsn()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        server = conn.execute("SELECT host(inet_server_addr()), inet_server_port()").fetchone()
    assert server == ("127.0.0.1", postgres.port)


def listening(port: int) -> list[str]:
    """The local addresses (hex, as /proc/net/tcp* writes them) of the TCP sockets listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.append(address)
    return found


def test_listens_on_loopback_only(postgres: pgserver.PgServer) -> None:
    assert one(postgres.dsn(), "SHOW listen_addresses") == "127.0.0.1"
    assert listening(postgres.port) == ["0100007F"]  # 127.0.0.1 only: no 0.0.0.0, no IPv6, no other
    sockets = one(postgres.dsn(), "SHOW unix_socket_directories")
    assert Path(sockets).is_relative_to(postgres.directory)
    assert one(postgres.dsn(), "SHOW fsync") == "off"
    assert one(postgres.dsn(), "SHOW synchronous_commit") == "on"


SEEN: list[str] = []  # the databases pg_dsn gave the rounds below, in order


@pytest.mark.parametrize("round_", [1, 2, 3])
def test_pg_dsn_is_a_new_database_each_test(postgres: pgserver.PgServer, pg_dsn: str, round_: int) -> None:
    with connect(pg_dsn) as conn:
        name = conn.execute("SELECT current_database()").fetchone()[0]
        assert pg_dsn.endswith(f"/{name}") and name != "postgres"
        assert conn.execute("SELECT to_regclass('public.marker')").fetchone() == (None,)  # empty
        conn.execute("CREATE TABLE marker (round int)")
        conn.execute("INSERT INTO marker VALUES (%s)", (round_,))
    assert name not in SEEN
    with connect(postgres.dsn()) as conn:
        databases = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
    assert name in databases and not databases & set(SEEN)  # the earlier rounds' were dropped
    SEEN.append(name)


def test_stop_start_again_and_kill(postgres: pgserver.PgServer) -> None:
    """On a server of its own (stopping the session's would break the other tests)."""
    import psycopg

    with pgserver.temporary(postgres.bindir) as server:
        assert server.port != postgres.port
        dsn = server.create_database("outage")
        with connect(dsn) as conn:
            conn.execute("CREATE TABLE kept (n int)")
            conn.execute("INSERT INTO kept VALUES (1)")

        server.stop()
        assert not server.running
        with pytest.raises(psycopg.OperationalError):
            connect(dsn)

        server.start_again()
        port = server.port
        assert one(dsn, "SELECT count(*) FROM kept") == 1
        with connect(dsn) as conn:
            conn.execute("INSERT INTO kept VALUES (2)")  # committed: must survive the crash

        server.kill()
        with pytest.raises(psycopg.OperationalError):
            connect(dsn)
        server.start_again()  # crash recovery
        assert server.port == port
        assert one(dsn, "SELECT count(*) FROM kept") == 2
        directory = server.directory
    assert not directory.exists()  # removed, data directory (the server's user's) and all
