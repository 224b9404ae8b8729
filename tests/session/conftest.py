"""Fixtures of the session tests: a fault server, the queue backend, and a harness of the test module's kind.

Every test of a module that defines a ``Harness`` runs once per queue backend
("spool", "memory"); ``@pytest.mark.spool_only`` keeps a test on the spool
(it reaches into spool files or the spool's threadpool calls).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import session_harness
from faultserver import FaultServer
from session_harness import BACKENDS, Harness


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "spool_only: runs on the spool backend only (spool files, threadpool)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" not in metafunc.fixturenames or not hasattr(metafunc.module, "Harness"):
        return
    spool_only = metafunc.definition.get_closest_marker("spool_only") is not None
    metafunc.parametrize("backend", ["spool"] if spool_only else list(BACKENDS), indirect=True)


@pytest.fixture(autouse=True)
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """The queue backend every Harness of this test is built on."""
    name = getattr(request, "param", "spool")
    session_harness.BACKEND = name
    yield name
    session_harness.BACKEND = "spool"
    session_harness.MEMORY.clear()


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer() as srv:
        yield srv


@pytest.fixture
def h(request: pytest.FixtureRequest, tmp_path: Path, server: FaultServer, backend: str) -> Iterator[Harness]:
    """The module's ``Harness`` class (its timeouts, its relay settings) against ``server``."""
    harness = request.module.Harness(tmp_path, server.port)
    yield harness
    harness.assert_settled()
