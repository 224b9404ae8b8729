"""Fixtures of the session tests: a fault server, and a harness of the test module's kind."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from faultserver import FaultServer
from session_harness import Harness


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer() as srv:
        yield srv


@pytest.fixture
def h(request: pytest.FixtureRequest, tmp_path: Path, server: FaultServer) -> Iterator[Harness]:
    """The module's ``Harness`` class (its timeouts, its relay settings) against ``server``."""
    harness = request.module.Harness(tmp_path, server.port)
    yield harness
    harness.assert_settled()
