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
