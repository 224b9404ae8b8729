"""The fault server itself: scripting with smtplib, and its subprocess mode."""

from __future__ import annotations

import contextlib
import json
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faultserver import FaultServer
from support import ROOT

SCRIPT = ROOT / "tests" / "faultserver.py"


def test_defaults_accept_and_record_everything() -> None:
    with FaultServer() as srv, smtplib.SMTP("127.0.0.1", srv.port, timeout=5) as c:
        assert c.ehlo("me.test")[0] == 250
        assert c.has_extn("pipelining")
        c.sendmail("a@x.test", ["b@y.test", "c@y.test"], b"Subject: s\r\n\r\n.dot\r\nend\r\n")
        c.sendmail("d@x.test", ["e@y.test"], b"second\r\n")
    assert srv.connections == 1
    assert srv.verbs() == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "MAIL", "RCPT", "DATA", "QUIT"]
    first, second = srv.messages
    assert (first["sender"], first["recipients"]) == ("a@x.test", ["b@y.test", "c@y.test"])
    assert first["data"] == b"Subject: s\r\n\r\n.dot\r\nend\r\n"
    assert b"\r\n..dot\r\n" in first["wire"]
    assert first["reply"].startswith("250")
    assert second["data"] == b"second\r\n"


def test_per_occurrence_and_per_recipient_rules() -> None:
    script = {
        "helo": ["550 no ehlo"],
        "rcpt": {"when": {"<bad@": "550 5.1.1 unknown"}, "else": ["250 first", "251 second"]},
    }
    with FaultServer(script) as srv, smtplib.SMTP("127.0.0.1", srv.port, timeout=5) as c:
        assert c.ehlo()[0] == 550
        assert c.helo()[0] == 250
        c.mail("a@x.test")
        assert c.rcpt("bad@y.test")[0] == 550
        assert c.rcpt("ok@y.test")[0] == 251  # the stage's second occurrence
    assert srv.verbs()[:2] == ["EHLO", "HELO"]


@pytest.mark.parametrize("action", ["drop", "stall", "huge", "endless", "trickle"])
def test_faults_end_when_the_client_goes(action: str) -> None:
    with FaultServer({"mail": action}) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as c:
            assert c.recv(100).startswith(b"220")
            c.sendall(b"MAIL FROM:<a@x.test>\r\n")
            c.settimeout(0.2)
            got, until = 0, time.monotonic() + 0.5
            with contextlib.suppress(OSError):
                while got < 1024 * 1024 and time.monotonic() < until and (data := c.recv(65536)):
                    got += len(data)
        deadline = time.monotonic() + 5
        while srv.closed < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert srv.closed == 1
        assert srv.commands() == ["MAIL FROM:<a@x.test>"]


def test_subprocess_mode(tmp_path: Path) -> None:
    log = tmp_path / "log.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(SCRIPT),
            "--port",
            "0",
            "--script",
            json.dumps({"rcpt": "450 later"}),
            "--log",
            str(log),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("READY ")
        port = int(line.split()[1])
        with smtplib.SMTP("127.0.0.1", port, timeout=5) as c:
            c.ehlo()
            c.mail("a@x.test")
            assert c.rcpt("b@y.test")[0] == 450
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    seen = json.loads(log.read_text())
    assert seen["connections"] == 1
    assert [c.upper() for c in seen["commands"][0][1:]] == [
        "MAIL FROM:<A@X.TEST>",
        "RCPT TO:<B@Y.TEST>",
        "QUIT",
    ]
