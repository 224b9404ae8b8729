"""Fixtures of the interop suite: certificates, a Postfix and an Exim relaying to an aiosmtpd
downstream (one of each per test module), and aiosmtpd TLS/AUTH peers per test.

The peers come from tests/peers/install.sh; without them the tests that need them skip.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

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
    d = tmp_path_factory.mktemp("postfix")
    downstream = peers.Aiosmtpd(d / "downstream", "--smtputf8")
    try:
        mta = peers.Postfix(downstream.port, certs, keep=d)
        try:
            yield PostfixRelay(mta, downstream)
        finally:
            mta.stop()
    finally:
        downstream.stop()


@pytest.fixture(scope="module")
def exim(tmp_path_factory: pytest.TempPathFactory, certs: peers.Certs) -> Iterator[EximRelay]:
    peers.need_exim()
    d = tmp_path_factory.mktemp("exim")
    downstream = peers.Aiosmtpd(d / "downstream", "--smtputf8")
    try:
        mta = peers.Exim(downstream.port, certs, keep=d)
        try:
            yield EximRelay(mta, downstream)
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
