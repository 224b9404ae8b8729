"""Shared pytest set-up: Hypothesis profiles ("ci" when $CI is set, else "dev"), and the PostgreSQL
fixtures: ``postgres`` (one private server for the session, tests/pgserver.py) and ``pg_dsn``
(a fresh database on it for one test)."""

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import suppress
from typing import NoReturn

import pgserver
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=60, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def _unavailable(message: str) -> NoReturn:
    """Skip, or fail under CI (where .ci/run installs everything)."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres() -> Iterator[pgserver.PgServer]:
    """A started PostgreSQL server of this session's own, on 127.0.0.1; stopped and removed after."""
    bindir = pgserver.find_bindir()
    if bindir is None:
        _unavailable(
            "PostgreSQL's server binaries (initdb, postgres) are not installed"
            " (Debian package 'postgresql-15'; .ci/run installs postgresql-15)"
        )
    # In a child: importing psycopg here would fix its wait function for this whole process.
    probe = subprocess.run([sys.executable, "-c", "import psycopg"], capture_output=True, timeout=60)
    if probe.returncode != 0:
        _unavailable(
            "psycopg 3 is not importable: pip install 'greenmail[postgresql]' (make test installs it)\n"
            + (probe.stderr.decode(errors="replace").strip().splitlines() or [""])[-1]
        )
    with pgserver.temporary(bindir) as server:
        yield server


@pytest.fixture
def pg_dsn(postgres: pgserver.PgServer) -> Iterator[str]:
    """The DSN of a new, empty database on ``postgres`` for this test only; dropped after."""
    name = f"test_{uuid.uuid4().hex}"
    dsn = postgres.create_database(name)
    yield dsn
    with suppress(Exception):  # a test that stopped the server, say: the server goes at the end anyway
        postgres.drop_database(name)
