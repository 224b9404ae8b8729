"""The SMTP listener end to end: the real daemon, smtplib and raw sockets as clients."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import support
from aiosmtpd_server import Relay, start_daemon, start_relay

MESSAGE = b"Subject: via the listener\r\n\r\nhello\r\n"


class Setup:
    def __init__(self, tmp: Path, relay: Relay) -> None:
        self.tmp, self.relay = tmp, relay
        self.port = support.free_port()
        self.mport = support.free_port()
        self.daemon: support.Process | None = None

    def start(self, **listener: object) -> support.Process:
        cfg = support.write_config(
            self.tmp,
            self.relay.port,
            listener={"listen": [f"127.0.0.1:{self.port}"], **listener},
            addresses={"origin": "example.org", "hostname": "mx.test"},
            metrics={"listen": f"127.0.0.1:{self.mport}"},
            delivery={"shutdown_grace": 5},
        )
        self.cfg = cfg
        self.daemon = start_daemon(cfg, self.tmp / "daemon.log", metrics_port=self.mport)
        return self.daemon

    def client(self) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.port, timeout=10)

    def raw(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        assert recv_reply(s).startswith(b"220 ")
        return s

    def queued_files(self) -> list[str]:
        spool = self.tmp / "spool"
        return [
            n
            for d in ("tmp", "outgoing", "outgoing_active")
            for n in os.listdir(spool / d)
            if not n.startswith(".")
        ]


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    relay = start_relay(tmp_path)
    s = Setup(tmp_path, relay)
    yield s
    if s.daemon is not None:
        s.daemon.stop()
    relay.stop()
    if s.relay is not relay:  # a test started another in its place
        s.relay.stop()


def recv_reply(s: socket.socket) -> bytes:
    """One complete (possibly multi-line) reply."""
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk
        last = data.rstrip(b"\r\n").split(b"\r\n")[-1]
        if data.endswith(b"\r\n") and len(last) >= 4 and last[3:4] == b" ":
            return data


def replies(s: socket.socket, n: int) -> list[bytes]:
    """``n`` reply lines' codes (final lines only), read as they come."""
    data = b""
    while data.count(b"\r\n") < n or any(line[3:4] == b"-" for line in data.split(b"\r\n")[-2:-1]):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return [line[:3] for line in data.split(b"\r\n") if line[3:4] == b" "]


def test_a_message_over_smtp_is_delivered_with_received_and_rewriting(setup: Setup) -> None:
    d = setup.start()
    c = setup.client()
    code, ehlo = c.ehlo("app.test")
    assert code == 250
    for ext in (b"PIPELINING", b"SIZE 10240000", b"8BITMIME", b"ENHANCEDSTATUSCODES", b"SMTPUTF8"):
        assert ext in ehlo
    c.mail("app")
    c.rcpt("root")
    code, text = c.data(MESSAGE)
    c.quit()
    assert code == 250 and text.startswith(b"2.0.0 Ok: queued as "), text
    qid = text.split()[-1].decode()
    support.wait_until(lambda: setup.relay.count() == 1, 10, what="the delivery")
    [m] = setup.relay.messages()
    assert m.mail_from == "app@example.org" and m.rcpt_tos == ["root@example.org"]
    first = m.content.split(b"\r\n")[0]
    assert first == b"Received: from app.test (localhost [127.0.0.1])", m.content[:200]
    assert f"with ESMTP id {qid};".encode() in m.content
    assert m.content.endswith(b"hello\r\n")
    support.wait_until(lambda: f"{qid}: client=localhost[127.0.0.1]" in d.text(), 5, what="the smtpd line")


def test_pipelined_commands_are_answered_in_order(setup: Setup) -> None:
    setup.start()
    s = setup.raw()
    s.sendall(b"EHLO p.test\r\n")
    recv_reply(s)
    s.sendall(
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nRCPT TO:<bad address>\r\n"
        b"RCPT TO:<c@example.net>\r\nDATA\r\n"
    )
    assert replies(s, 5) == [b"250", b"250", b"501", b"250", b"354"]
    s.sendall(b"Subject: p\r\n\r\n..dot\r\n.\r\nNOOP\r\nQUIT\r\n")
    assert replies(s, 3) == [b"250", b"250", b"221"]
    support.wait_until(lambda: setup.relay.count() == 1, 10, what="the delivery")
    [m] = setup.relay.messages()
    assert m.rcpt_tos == ["b@example.net", "c@example.net"] and b"\r\n.dot\r\n" in m.content


def test_errors_for_order_syntax_unknown_and_long_lines(setup: Setup) -> None:
    setup.start()
    s = setup.raw()
    s.sendall(
        b"RCPT TO:<a@b.example>\r\nDATA\r\nMAIL FROM:a@b\r\nFROB\r\n" + b"NOOP " + b"x" * 1200 + b"\r\n"
    )
    s.sendall(b"VRFY root\r\nHELP\r\nSTARTTLS\r\nAUTH PLAIN\r\n\x00\x01garbage\r\nQUIT\r\n")
    assert replies(s, 11) == [
        b"503", b"503", b"501", b"500", b"500", b"252", b"214", b"502", b"502", b"500", b"221"
    ]  # fmt: skip


def test_a_client_outside_allow_cannot_relay(setup: Setup) -> None:
    setup.start(allow=["10.0.0.0/8"])
    c = setup.client()
    c.ehlo("outside.test")
    c.mail("a@example.org")
    code, text = c.rcpt("b@example.net")
    assert code == 554 and text.startswith(b"5.7.1"), text
    c.quit()
    assert setup.queued_files() == []


def test_max_clients_refuses_the_next_at_the_banner(setup: Setup) -> None:
    setup.start(max_clients=2)
    first, second = setup.raw(), setup.raw()
    third = socket.create_connection(("127.0.0.1", setup.port), timeout=10)
    assert recv_reply(third).startswith(b"421 4.7.0 ")
    first.close()
    support.wait_until(lambda: _banner(setup.port).startswith(b"220 "), 10, what="room again")
    second.close()


def _banner(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        return recv_reply(s)


def test_an_idle_client_is_left_after_the_timeout(setup: Setup) -> None:
    setup.start(timeout=0.5)
    s = setup.raw()
    s.sendall(b"EHLO slow.test\r\n")
    recv_reply(s)
    assert recv_reply(s).startswith(b"421 4.4.2 ")  # nothing sent for 0.5 s
    assert s.recv(100) == b""


def test_an_oversize_message_is_refused_and_nothing_is_left(setup: Setup) -> None:
    setup.start(max_message_size=1000)
    c = setup.client()
    c.ehlo("big.test")
    assert c.mail("a@example.org", ["SIZE=5000"])[0] == 552
    c.rset()
    c.mail("a@example.org")
    c.rcpt("b@example.net")
    code, _ = c.data(b"Subject: big\r\n\r\n" + b"x" * 5000 + b"\r\n")
    assert code == 552
    c.quit()
    assert setup.queued_files() == []


def test_a_client_dropping_mid_data_leaves_nothing(setup: Setup) -> None:
    setup.start()
    s = setup.raw()
    s.sendall(b"EHLO drop.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
    assert replies(s, 4)[-1] == b"354"
    s.sendall(b"Subject: half\r\n\r\n" + b"y" * 200_000)
    s.close()
    support.wait_until(lambda: setup.queued_files() == [], 10, what="the partial file removed")
    assert setup.relay.count() == 0


def test_fifty_clients_ten_messages_each_are_delivered_exactly_once(setup: Setup) -> None:
    setup.start(max_clients=60)
    errors: list[BaseException] = []

    def client(k: int) -> None:
        try:
            c = setup.client()
            for i in range(10):
                c.sendmail(
                    "a@example.org", ["b@example.net"], f"Message-ID: <c{k}-m{i}@t>\r\n\r\nx\r\n".encode()
                )
            c.quit()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    support.wait_until(lambda: setup.relay.count() >= 500, 60, what="500 messages")
    ids = setup.relay.message_ids()
    assert len(ids) == 500 and set(ids) == {f"<c{k}-m{i}@t>" for k in range(50) for i in range(10)}


def test_graceful_stop_lets_a_transaction_in_data_finish(setup: Setup) -> None:
    d = setup.start()
    s = setup.raw()
    idle = setup.raw()
    s.sendall(
        b"EHLO g.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nSubject: g\r\n\r\n"
    )
    assert replies(s, 4)[-1] == b"354"
    d.signal(signal.SIGTERM)
    assert recv_reply(idle).startswith(b"421 4.3.2 ")  # an idle client is told at once
    support.wait_until(lambda: _refused(setup.port), 10, what="no new clients")
    s.sendall(b"body\r\n.\r\n")
    assert recv_reply(s).startswith(b"250 2.0.0 Ok: queued as ")
    assert d.wait(20) == 0
    assert len(setup.queued_files()) + setup.relay.count() == 1


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
            return not recv_reply(c).startswith(b"220")
    except OSError:
        return True


def test_kill_9_after_the_250_still_delivers(setup: Setup) -> None:
    relay_port = setup.relay.port
    setup.relay.stop()  # nothing is delivered while the daemon runs
    d = setup.start()
    c = setup.client()
    c.sendmail("a@example.org", ["b@example.net"], b"Message-ID: <k9@t>\r\n\r\nsurvives\r\n")
    d.proc.kill()
    d.wait(10)
    setup.relay = start_relay(setup.tmp, name="relay2", port=relay_port)
    setup.daemon = start_daemon(setup.cfg, setup.tmp / "daemon2.log", metrics_port=setup.mport)
    support.wait_until(lambda: setup.relay.count() == 1, 15, what="the delivery after the restart")
    assert setup.relay.message_ids() == ["<k9@t>"]


def test_messages_received_counts_each_arrival_once_by_source(setup: Setup) -> None:
    import promtool_support as pt

    setup.start()
    c = setup.client()
    c.sendmail("a@example.org", ["b@example.net"], b"Message-ID: <smtp@t>\r\n\r\nx\r\n")
    c.quit()
    support.enqueue(setup.cfg, b"Message-ID: <local@t>\n\nx\n", "a@example.org", "b@example.net")
    support.wait_until(lambda: setup.relay.count() == 2, 10, what="both delivered")

    def received() -> dict[str, float]:
        samples = pt.parse(pt.http_get(f"http://127.0.0.1:{setup.mport}/metrics")[1].decode())
        return {s: samples[pt.key("greenmail_messages_received_total", source=s)] for s in ("smtp", "local")}

    support.wait_until(lambda: received() == {"smtp": 1, "local": 1}, 10, what="received 1 and 1")
