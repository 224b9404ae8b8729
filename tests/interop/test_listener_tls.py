"""The listener's STARTTLS with a real certificate (the interop CA), smtplib as the client."""

from __future__ import annotations

import smtplib
import ssl
from pathlib import Path

import peers
import support
from aiosmtpd_server import start_daemon, start_relay


def test_starttls_then_a_message_is_received_with_esmtps(tmp_path: Path, certs: peers.Certs) -> None:
    relay = start_relay(tmp_path)
    port, mport = support.free_port(), support.free_port()
    try:
        cfg = support.write_config(
            tmp_path,
            relay.port,
            listener={
                "listen": [f"127.0.0.1:{port}"],
                "tls_cert": str(certs.server.cert),
                "tls_key": str(certs.server.key),
            },
            metrics={"listen": f"127.0.0.1:{mport}"},
        )
        d = start_daemon(cfg, tmp_path / "daemon.log", metrics_port=mport)
        try:
            c = smtplib.SMTP("127.0.0.1", port, timeout=10)
            c.ehlo("tls.test")
            assert c.has_extn("starttls")
            ctx = ssl.create_default_context(cafile=str(certs.ca))
            code, _ = c.starttls(context=ctx)
            assert code == 220
            c.ehlo("tls.test")
            assert not c.has_extn("starttls")  # offered once
            version = c.sock.version()
            c.sendmail("a@example.org", ["b@example.net"], b"Subject: tls\r\n\r\nsecret\r\n")
            c.quit()
            support.wait_until(lambda: relay.count() == 1, 10, what="the delivery")
        finally:
            assert d.stop() == 0
        [m] = relay.messages()
        assert b"(greenmail) with ESMTPS id " in m.content
        assert version in ("TLSv1.2", "TLSv1.3")
    finally:
        relay.stop()


def test_auth_after_starttls_lets_a_client_outside_allow_submit(tmp_path: Path, certs: peers.Certs) -> None:
    users = tmp_path / "users"
    r = support.greenmail("user", "add", "app", "--users-file", str(users), stdin=b"pw-of-app\n")
    assert r.returncode == 0, r.stderr
    assert (users.stat().st_mode & 0o777) == 0o600 and b"pw-of-app" not in users.read_bytes()
    relay = start_relay(tmp_path)
    port, mport = support.free_port(), support.free_port()
    try:
        cfg = support.write_config(
            tmp_path,
            relay.port,
            listener={
                "listen": [f"127.0.0.1:{port}"],
                "allow": ["10.0.0.0/8"],  # 127.0.0.1 is not allowed: only AUTH lets it submit
                "tls_cert": str(certs.server.cert),
                "tls_key": str(certs.server.key),
                "users_file": str(users),
            },
            metrics={"listen": f"127.0.0.1:{mport}"},
        )
        d = start_daemon(cfg, tmp_path / "daemon.log", metrics_port=mport)
        try:
            c = smtplib.SMTP("127.0.0.1", port, timeout=10)
            c.ehlo("auth.test")
            assert not c.has_extn("auth")  # never offered in clear
            assert c.docmd("AUTH", "PLAIN AGFwcABwdy1vZi1hcHA=")[0] == 538
            c.starttls(context=ssl.create_default_context(cafile=str(certs.ca)))
            c.ehlo("auth.test")
            assert c.has_extn("auth")
            c.mail("a@example.org")
            assert c.rcpt("b@example.net")[0] == 554  # not yet authenticated
            c.rset()
            try:
                c.login("app", "wrong")
                raise AssertionError("a wrong password was accepted")
            except smtplib.SMTPAuthenticationError as e:
                assert e.smtp_code == 535
            c.login("app", "pw-of-app")  # PLAIN: smtplib takes the first mechanism both offer
            c.sendmail("a@example.org", ["b@example.net"], b"Subject: auth\r\n\r\nx\r\n")
            c.quit()
            c2 = smtplib.SMTP("127.0.0.1", port, timeout=10)  # LOGIN, the other mechanism
            c2.ehlo("auth.test")
            c2.starttls(context=ssl.create_default_context(cafile=str(certs.ca)))
            c2.ehlo("auth.test")
            c2.user, c2.password = "app", "pw-of-app"
            assert c2.auth("LOGIN", c2.auth_login)[0] == 235
            c2.quit()
            support.wait_until(lambda: relay.count() == 1, 10, what="the delivery")
        finally:
            assert d.stop() == 0
        [m] = relay.messages()
        assert b"(greenmail) with ESMTPSA id " in m.content
        assert "pw-of-app" not in (tmp_path / "daemon.log").read_text()
    finally:
        relay.stop()
