"""TLS and AUTH of the real ``greenmail run --once`` against aiosmtpd (tests/peers/aiosmtpd_tls.py).

The server records every command with whether it came over TLS, the AUTH
results, and each message with its TLS version, client certificate and login.
A failure to set up TLS or to authenticate is a connection-level failure: the
message stays queued with attempts 0, nothing fails, nothing bounces.
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Callable
from pathlib import Path

import peers
import pytest
import support
from peers import (
    PASSWORD,
    USER,
    Aiosmtpd,
    Certs,
    assert_still_queued,
    message,
    message_id,
    password_file,
    queue,
    run_once,
)

SENDER, RCPT = "sender@example.org", "rcpt@example.net"
Start = Callable[..., Aiosmtpd]


def tls_server(
    start: Start,
    certs: Certs,
    mode: str = "starttls",
    pair: peers.Pair | None = None,
    *extra: str,
    name="relay",
) -> Aiosmtpd:
    pair = pair or certs.server
    return start("--tls", mode, "--cert", pair.cert, "--key", pair.key, *extra, name=name)


def auth_server(start: Start, certs: Certs, mode: str) -> Aiosmtpd:
    extra = ["--auth", f"{USER}:{PASSWORD}", "--auth-required"]
    if mode == "starttls":
        extra.append("--require-starttls")
    return tls_server(start, certs, mode, None, *extra)


def delivered(server: Aiosmtpd, cfg: Path, tag: str, log: str) -> peers.Received:
    """The queue is empty and ``tag`` arrived unchanged."""
    assert queue(cfg) == [], log
    got = server.wait_message(message_id(tag))
    assert got.content == message(tag)
    assert (got.mail_from, got.rcpt_tos) == (SENDER, [RCPT])
    return got


def assert_nothing_sent(server: Aiosmtpd) -> None:
    assert server.messages() == []
    assert "MAIL" not in server.verbs(), server.commands()


# -- AUTH ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "mechanism"),
    [
        ("starttls", "PLAIN"),
        ("starttls", "LOGIN"),
        ("starttls", "CRAM-MD5"),
        ("implicit", "PLAIN"),
        ("implicit", "LOGIN"),
    ],
)
def test_auth_succeeds_over_tls(aiosmtpd: Start, certs: Certs, tmp_path: Path, mode: str, mechanism: str):
    server = auth_server(aiosmtpd, certs, mode)
    tag = f"auth-{mode}-{mechanism.lower()}"
    cfg = peers.config(
        tmp_path,
        server.port,
        tls=mode,
        ca_file=certs.ca,
        username=USER,
        password_file=password_file(tmp_path),
        auth_mechanisms=[mechanism],
    )
    support.enqueue(cfg, message(tag), SENDER, RCPT)
    log = run_once(cfg)
    got = delivered(server, cfg, tag, log)
    assert got.meta["auth"] == USER and got.meta["tls"] in ("TLSv1.2", "TLSv1.3"), got.meta
    [session] = server.sessions()
    assert session["auth"] == ["ok"]
    auths = [c for c in session["commands"] if c[0] == "AUTH"]
    assert auths == [["AUTH", mechanism, True]], session["commands"]
    if mode == "starttls":  # in clear only EHLO and STARTTLS; then EHLO again, over TLS
        verbs = [(c[0], c[2]) for c in session["commands"]]
        assert verbs[:3] == [("EHLO", False), ("STARTTLS", False), ("EHLO", True)], verbs
        assert all(tls for _, tls in verbs[2:]), verbs
    else:
        assert session["tls"] and all(c[2] for c in session["commands"]), session


def test_auth_mechanism_preference_order(aiosmtpd: Start, certs: Certs, tmp_path: Path):
    """The server offers CRAM-MD5 LOGIN PLAIN; greenmail takes the first of its own list it offers."""
    server = auth_server(aiosmtpd, certs, "starttls")
    cfg = peers.config(
        tmp_path,
        server.port,
        tls="starttls",
        ca_file=certs.ca,
        username=USER,
        password_file=password_file(tmp_path),
        auth_mechanisms=["LOGIN", "PLAIN"],
    )
    support.enqueue(cfg, message("auth-preference"), SENDER, RCPT)
    delivered(server, cfg, "auth-preference", run_once(cfg))
    assert [c[1] for c in server.commands() if c[0] == "AUTH"] == ["LOGIN"]


def test_auth_password_from_the_environment(
    aiosmtpd: Start, certs: Certs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    server = auth_server(aiosmtpd, certs, "starttls")
    monkeypatch.setenv("GREENMAIL_INTEROP_PASSWORD", PASSWORD)
    cfg = peers.config(
        tmp_path,
        server.port,
        tls="starttls",
        ca_file=certs.ca,
        username=USER,
        password_env="GREENMAIL_INTEROP_PASSWORD",
    )
    support.enqueue(cfg, message("auth-env"), SENDER, RCPT)
    got = delivered(server, cfg, "auth-env", run_once(cfg))
    assert got.meta["auth"] == USER


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_wrong_password_keeps_the_message_queued(aiosmtpd: Start, certs: Certs, tmp_path: Path, mode: str):
    server = auth_server(aiosmtpd, certs, mode)
    cfg = peers.config(
        tmp_path,
        server.port,
        tls=mode,
        ca_file=certs.ca,
        username=USER,
        password_file=password_file(tmp_path, "not the password"),
    )
    qid = support.enqueue(cfg, message(f"auth-wrong-{mode}"), SENDER, RCPT)
    log = run_once(cfg)
    assert_still_queued(cfg, qid)
    assert_nothing_sent(server)
    results = [r for s in server.sessions() for r in s["auth"]]
    assert results and set(results) == {"failed"}, server.sessions()
    assert "535" in log, log


@pytest.mark.parametrize("tls", ["none", "opportunistic"])
def test_auth_is_never_sent_in_clear(aiosmtpd: Start, tmp_path: Path, tls: str):
    """The server offers AUTH without TLS (and has no STARTTLS): greenmail must not send the password."""
    server = aiosmtpd("--auth", f"{USER}:{PASSWORD}", "--auth-required", "--auth-plaintext")
    cfg = peers.config(tmp_path, server.port, tls=tls, username=USER, password_file=password_file(tmp_path))
    qid = support.enqueue(cfg, message(f"auth-clear-{tls}"), SENDER, RCPT)
    log = run_once(cfg)
    assert_still_queued(cfg, qid)
    assert "AUTH" not in server.verbs(), server.commands()
    assert_nothing_sent(server)
    assert PASSWORD not in log


def test_auth_in_clear_when_explicitly_allowed(aiosmtpd: Start, tmp_path: Path):
    server = aiosmtpd("--auth", f"{USER}:{PASSWORD}", "--auth-required", "--auth-plaintext")
    cfg = peers.config(
        tmp_path,
        server.port,
        tls="none",
        username=USER,
        password_file=password_file(tmp_path),
        auth_allow_plaintext=True,
    )
    support.enqueue(cfg, message("auth-clear-allowed"), SENDER, RCPT)
    got = delivered(server, cfg, "auth-clear-allowed", run_once(cfg))
    assert got.meta["auth"] == USER and got.meta["tls"] is None


# -- certificate verification ---------------------------------------------------------------------


# what greenmail's log must say, by case (OpenSSL's verification messages, as Python reports them)
UNVERIFIABLE = {
    "self-signed-no-ca-file": r"(?i)verify failed|self.signed",
    "unknown-ca": r"(?i)verify failed|unable to get local issuer",
    "wrong-host": r"(?i)mismatch|not valid for",
    "expired": r"(?i)expired",
    "self-signed": r"(?i)verify failed|self.signed",
    "server-name": r"(?i)mismatch|not valid for",
}


@pytest.mark.parametrize("case", list(UNVERIFIABLE))
@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_unverifiable_certificate_is_refused(
    aiosmtpd: Start, certs: Certs, tmp_path: Path, mode: str, case: str
):
    pair = {
        "wrong-host": certs.wrong_host,
        "expired": certs.expired,
        "self-signed": certs.self_signed,
        "self-signed-no-ca-file": certs.self_signed,
    }.get(case, certs.server)
    server = tls_server(aiosmtpd, certs, mode, pair)
    relay = {"tls": mode}
    if case not in ("self-signed-no-ca-file", "unknown-ca"):  # else the system store, without the test CA
        relay["ca_file"] = certs.ca
    if case == "server-name":  # a good certificate, but for another name than the one expected
        relay["tls_server_name"] = "mail.example.com"
    cfg = peers.config(tmp_path, server.port, **relay)
    qid = support.enqueue(cfg, message(f"verify-{mode}-{case}"), SENDER, RCPT)
    log = run_once(cfg)
    assert_still_queued(cfg, qid)
    assert_nothing_sent(server)
    if mode == "starttls":
        assert "STARTTLS" in server.verbs(), server.commands()
    assert re.search(UNVERIFIABLE[case], log), log
    assert re.search(r"(?i)\b(tls|ssl|certificate)\b", log), log


@pytest.mark.parametrize(
    ("name", "relay"),
    [
        ("verify-off", {"tls_verify": False}),  # any certificate is accepted
        ("server-name", {"tls_server_name": "localhost"}),  # the certificate's DNS name instead of the IP
    ],
)
def test_verification_controls(aiosmtpd: Start, certs: Certs, tmp_path: Path, name: str, relay: dict):
    pair = certs.self_signed if name == "verify-off" else certs.server
    server = tls_server(aiosmtpd, certs, "starttls", pair)
    ca = {} if name == "verify-off" else {"ca_file": certs.ca}
    cfg = peers.config(tmp_path, server.port, tls="starttls", **ca, **relay)
    tag = f"verify-control-{name}"
    support.enqueue(cfg, message(tag), SENDER, RCPT)
    got = delivered(server, cfg, tag, run_once(cfg))
    assert got.meta["tls"] in ("TLSv1.2", "TLSv1.3"), got.meta


def test_client_certificate_is_presented(aiosmtpd: Start, certs: Certs, tmp_path: Path):
    server = tls_server(aiosmtpd, certs, "starttls", None, "--client-ca", certs.ca)
    cfg = peers.config(
        tmp_path,
        server.port,
        tls="starttls",
        ca_file=certs.ca,
        tls_cert_file=certs.client.cert,
        tls_key_file=certs.client.key,
    )
    support.enqueue(cfg, message("client-cert"), SENDER, RCPT)
    got = delivered(server, cfg, "client-cert", run_once(cfg))
    assert got.meta["client_cert"] == "greenmail-client", got.meta


# -- STARTTLS policy -------------------------------------------------------------------------


@pytest.mark.parametrize("tls", [None, "opportunistic"])
def test_opportunistic_sends_in_clear_without_starttls(aiosmtpd: Start, tmp_path: Path, tls: str | None):
    """No STARTTLS offered: opportunistic (the default for a loopback relay) sends in clear."""
    server = aiosmtpd()
    cfg = peers.config(tmp_path, server.port, **({"tls": tls} if tls else {}))
    tag = f"opportunistic-clear-{tls or 'default'}"
    support.enqueue(cfg, message(tag), SENDER, RCPT)
    got = delivered(server, cfg, tag, run_once(cfg))
    assert got.meta["tls"] is None
    assert "STARTTLS" not in server.verbs()


def test_opportunistic_uses_starttls_when_offered(aiosmtpd: Start, certs: Certs, tmp_path: Path):
    server = tls_server(aiosmtpd, certs, "starttls")
    cfg = peers.config(tmp_path, server.port, tls="opportunistic", ca_file=certs.ca)
    support.enqueue(cfg, message("opportunistic-tls"), SENDER, RCPT)
    got = delivered(server, cfg, "opportunistic-tls", run_once(cfg))
    assert got.meta["tls"] in ("TLSv1.2", "TLSv1.3"), got.meta


def test_starttls_required_but_not_offered_sends_nothing(aiosmtpd: Start, certs: Certs, tmp_path: Path):
    server = aiosmtpd()
    cfg = peers.config(tmp_path, server.port, tls="starttls", ca_file=certs.ca)
    qid = support.enqueue(cfg, message("starttls-missing"), SENDER, RCPT)
    log = run_once(cfg)
    assert_still_queued(cfg, qid)
    assert_nothing_sent(server)
    assert "EHLO" in server.verbs()
    assert re.search(r"(?i)starttls", log), log


# -- failover --------------------------------------------------------------------------------


def test_failover_to_the_second_relay(aiosmtpd: Start, tmp_path: Path):
    refusing = support.free_port()  # nothing listens there
    server = aiosmtpd()
    cfg = peers.config(tmp_path, hosts=[f"127.0.0.1:{refusing}", f"127.0.0.1:{server.port}"])
    support.enqueue(cfg, message("failover"), SENDER, RCPT)
    log = run_once(cfg)
    delivered(server, cfg, "failover", log)
    assert str(refusing) in log, log  # the failed first relay is logged


def test_failover_past_a_relay_with_a_bad_certificate(aiosmtpd: Start, certs: Certs, tmp_path: Path):
    bad = tls_server(aiosmtpd, certs, "starttls", certs.expired, name="bad")
    good = tls_server(aiosmtpd, certs, "starttls", None, name="good")
    cfg = peers.config(
        tmp_path, hosts=[f"127.0.0.1:{bad.port}", f"127.0.0.1:{good.port}"], tls="starttls", ca_file=certs.ca
    )
    support.enqueue(cfg, message("failover-tls"), SENDER, RCPT)
    delivered(good, cfg, "failover-tls", run_once(cfg))
    assert_nothing_sent(bad)


# -- metrics -----------------------------------------------------------------------------------


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        return r.read().decode()


def stage_count(text: str, stage: str) -> float:
    pattern = rf'^greenmail_smtp_stage_reached_total\{{[^}}]*stage="{stage}"[^}}]*\}} (\S+)$'
    return sum(float(m.group(1)) for m in re.finditer(pattern, text, re.MULTILINE))


def test_metrics_count_the_starttls_and_auth_stages(aiosmtpd: Start, certs: Certs, tmp_path: Path):
    server = auth_server(aiosmtpd, certs, "starttls")
    mport = support.free_port()
    cfg = peers.config(
        tmp_path,
        server.port,
        sections={"metrics": {"listen": f"127.0.0.1:{mport}"}, "delivery": {"check_interval": 0.2}},
        tls="starttls",
        ca_file=certs.ca,
        username=USER,
        password_file=password_file(tmp_path),
    )
    support.enqueue(cfg, message("metrics"), SENDER, RCPT)
    daemon = support.daemon(cfg, tmp_path / "daemon.log")
    try:
        server.wait_message(message_id("metrics"))
        support.wait_port(mport)

        def auth_counted() -> str | None:
            text = scrape(mport)
            return text if stage_count(text, "auth") >= 1 else None

        text = support.wait_until(auth_counted, 10, what="the auth stage in /metrics")
        assert stage_count(text, "starttls") >= 1, text
        assert stage_count(text, "auth") >= 1, text
    finally:
        daemon.stop()
