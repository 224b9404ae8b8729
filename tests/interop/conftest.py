"""Fixtures of the interop suite: certificates, a Postfix and an Exim relaying to an aiosmtpd
downstream (one of each per test module), and aiosmtpd TLS/AUTH peers per test.

The peers come from tests/peers/install.sh; without them the tests that need them skip.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import peers
import pytest
from peers import EximRelay, PostfixRelay


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> peers.Certs:
    peers.need_openssl()
    return peers.make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def postfix(tmp_path_factory: pytest.TempPathFactory, certs: peers.Certs) -> Iterator[PostfixRelay]:
    peers.need_postfix()
    yield from _relay(tmp_path_factory.mktemp("postfix"), certs, peers.Postfix, PostfixRelay)


@pytest.fixture(scope="module")
def exim(tmp_path_factory: pytest.TempPathFactory, certs: peers.Certs) -> Iterator[EximRelay]:
    peers.need_exim()
    yield from _relay(tmp_path_factory.mktemp("exim"), certs, peers.Exim, EximRelay)


def _relay(d: Path, certs: peers.Certs, mta_class: Any, pair: Any) -> Iterator[Any]:
    """An MTA relaying to an aiosmtpd downstream (where the relayed bytes are read back)."""
    downstream = peers.Aiosmtpd(d / "downstream", "--smtputf8")
    try:
        mta = mta_class(downstream.port, certs, keep=d)
        try:
            yield pair(mta, downstream)
        finally:
            mta.stop()
    finally:
        downstream.stop()


@pytest.fixture
def aiosmtpd(tmp_path: Path) -> Iterator[Callable[..., peers.Aiosmtpd]]:
    """A factory: ``aiosmtpd("--tls", "starttls", ...)`` starts tests/peers/aiosmtpd_tls.py."""
    started: list[peers.Aiosmtpd] = []

    def start(*options: str, name: str = "relay") -> peers.Aiosmtpd:
        p = peers.Aiosmtpd(tmp_path / name, *(str(o) for o in options))
        started.append(p)
        return p

    try:
        yield start
    finally:
        for p in started:
            p.stop()
