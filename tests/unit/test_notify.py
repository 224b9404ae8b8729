"""sd_notify over real AF_UNIX datagram sockets: path and abstract forms, the watchdog's variables."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from greenmail import notify


def receiver(addr: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(addr)
    s.settimeout(5)
    return s


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify.sock")
    s = receiver(path)
    yield path, s
    s.close()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, socket.socket]]:
    name = f"greenmail-test-{uuid.uuid4().hex}"
    s = receiver("\0" + name)
    yield "@" + name, s
    s.close()


@pytest.mark.parametrize("form", ["path_socket", "abstract_socket"])
def test_notifications_arrive_as_one_datagram_each(form: str, request: pytest.FixtureRequest) -> None:
    value, sock = request.getfixturevalue(form)
    env = {"NOTIFY_SOCKET": value}
    n = notify.Notifier.from_environ(env)
    assert n.enabled
    assert n.ready("delivering") and n.watchdog() and n.stopping()
    assert sock.recv(4096) == b"READY=1\nSTATUS=delivering"
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert sock.recv(4096) == b"STOPPING=1"
    n.close()


def test_a_status_cannot_inject_an_assignment(path_socket: tuple[str, socket.socket]) -> None:
    value, sock = path_socket
    n = notify.Notifier.from_environ({"NOTIFY_SOCKET": value})
    n.status("stale\nREADY=1")
    assert sock.recv(4096) == b"STATUS=stale READY=1"


def test_the_variables_leave_the_environment_so_children_cannot_notify() -> None:
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid()), "A": "b"}
    n = notify.Notifier.from_environ(env)
    assert env == {"A": "b"}
    assert n.enabled and n.watchdog_interval == 1.0
    kept = {"NOTIFY_SOCKET": "/run/x"}
    notify.Notifier.from_environ(kept, unset=False)
    assert kept == {"NOTIFY_SOCKET": "/run/x"}


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 30.0),  # no WATCHDOG_PID: meant for us
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{pid}"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # another process's watchdog
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], interval: float | None) -> None:
    pid = 4242
    full = {"NOTIFY_SOCKET": "@x", **{k: v.format(pid=pid) for k, v in env.items()}}
    assert notify.Notifier.from_environ(full, pid=pid).watchdog_interval == interval


def test_no_socket_means_no_watchdog_even_with_watchdog_usec() -> None:
    n = notify.Notifier.from_environ({"WATCHDOG_USEC": "1000000"})
    assert not n.enabled and n.watchdog_interval is None


def test_without_notify_socket_every_call_is_a_no_op() -> None:
    n = notify.Notifier.from_environ({})
    assert not n.enabled
    assert not n.ready() and not n.watchdog() and not n.stopping() and not n.status("x")
    n.close()


@pytest.mark.parametrize("value", ["relative/path", "vsock:2:1234", "@"])
def test_an_unusable_address_disables_notifications(value: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        n = notify.Notifier.from_environ({"NOTIFY_SOCKET": value})
    assert not n.enabled and not n.ready()
    assert "not a socket path" in caplog.text


def test_a_failing_send_is_logged_once_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n = notify.Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    with caplog.at_level(logging.WARNING):
        assert not n.ready()
        assert not n.watchdog()
    assert caplog.text.count("notification to the service manager failed") == 1


def test_a_full_receiver_drops_instead_of_blocking(path_socket: tuple[str, socket.socket]) -> None:
    value, sock = path_socket
    n = notify.Notifier.from_environ({"NOTIFY_SOCKET": value})
    results = [n.watchdog() for _ in range(5000)]  # nobody reads: the queue fills up
    assert results[0] and not results[-1]
    assert sock.recv(4096) == b"WATCHDOG=1"
