"""Real SMTP clients against the listener: Postfix's smtp-source (pipelined, many at once) and swaks
(STARTTLS and AUTH). Debian packages ``postfix`` and ``swaks``; CI installs both."""

from __future__ import annotations

import subprocess
from pathlib import Path

import peers
import support
from aiosmtpd_server import start_daemon, start_relay


def need(tool: str) -> str:
    return support.need_tool(tool, "postfix" if tool == "smtp-source" else tool)


def test_smtp_source_fifty_messages_over_ten_sessions_delivered_once(tmp_path: Path) -> None:
    source = need("smtp-source")
    relay = start_relay(tmp_path)
    port, mport = support.free_port(), support.free_port()
    try:
        cfg = support.write_config(
            tmp_path,
            relay.port,
            listener={"listen": [f"127.0.0.1:{port}"]},
            metrics={"listen": f"127.0.0.1:{mport}"},
        )
        d = start_daemon(cfg, tmp_path / "daemon.log", metrics_port=mport)
        try:
            # -s 10 parallel sessions, -m 50 messages in all, -l 2048 bytes each
            r = subprocess.run(
                [
                    source,
                    "-s",
                    "10",
                    "-m",
                    "50",
                    "-l",
                    "2048",
                    "-f",
                    "a@example.org",
                    "-t",
                    "b@example.net",
                    f"127.0.0.1:{port}",
                ],
                capture_output=True,
                timeout=120,
            )
            assert r.returncode == 0, r.stderr
            support.wait_until(lambda: relay.count() >= 50, 30, what="50 messages at the relay")
        finally:
            assert d.stop() == 0
        assert relay.count() == 50
        assert d.text().count(": client=localhost[127.0.0.1]") == 50
    finally:
        relay.stop()


def test_swaks_with_starttls_and_auth(tmp_path: Path, certs: peers.Certs) -> None:
    swaks = need("swaks")
    users = tmp_path / "users"
    assert support.greenmail("user", "add", "app", "--users-file", str(users), stdin=b"pw\n").returncode == 0
    relay = start_relay(tmp_path)
    port, mport = support.free_port(), support.free_port()
    try:
        cfg = support.write_config(
            tmp_path,
            relay.port,
            listener={
                "listen": [f"127.0.0.1:{port}"],
                "allow": ["192.0.2.0/24"],
                "tls_cert": str(certs.server.cert),
                "tls_key": str(certs.server.key),
                "users_file": str(users),
            },
            metrics={"listen": f"127.0.0.1:{mport}"},
        )
        d = start_daemon(cfg, tmp_path / "daemon.log", metrics_port=mport)
        try:
            base = [
                swaks,
                "--server",
                f"127.0.0.1:{port}",
                "--from",
                "a@example.org",
                "--to",
                "b@example.net",
            ]
            plain = subprocess.run([*base, "--header", "Subject: no auth"], capture_output=True, timeout=60)
            assert plain.returncode != 0 and b"554 5.7.1" in plain.stdout, plain.stdout
            ok = subprocess.run(
                [
                    *base,
                    "--tls",
                    "--auth",
                    "LOGIN",
                    "--auth-user",
                    "app",
                    "--auth-password",
                    "pw",
                    "--header",
                    "Subject: swaks",
                ],
                capture_output=True,
                timeout=60,
            )
            assert ok.returncode == 0, ok.stdout
            assert b"250 2.0.0 Ok: queued as " in ok.stdout
            support.wait_until(lambda: relay.count() == 1, 10, what="the delivery")
        finally:
            assert d.stop() == 0
        [m] = relay.messages()
        assert b"with ESMTPSA id " in m.content and b"Subject: swaks" in m.content
    finally:
        relay.stop()
