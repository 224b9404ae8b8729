"""``greenmail relay test`` against the scripted relay: each step, its failure and exit code."""

from __future__ import annotations

from pathlib import Path

import pytest
import support
from faultserver import FaultServer, ehlo

EX_UNAVAILABLE, EX_TEMPFAIL = 69, 75
AUTH_EHLO = ehlo("PIPELINING", "AUTH PLAIN LOGIN", "SIZE 1000000")


def run(tmp_path: Path, port: int, **relay: object) -> support.subprocess.CompletedProcess[bytes]:
    (tmp_path / "pw").write_text("s3cret-pw\n")
    (tmp_path / "pw").chmod(0o600)
    cfg = support.write_config(tmp_path, port, relay=relay)
    return support.greenmail("relay", "test", config=cfg)


def test_a_working_relay_is_described_and_sent_no_mail(tmp_path: Path) -> None:
    with FaultServer({"ehlo": AUTH_EHLO}) as srv:
        r = run(tmp_path, srv.port, username="app", password_file="pw", auth_allow_plaintext=True)
        verbs = srv.verbs()
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode().splitlines()
    assert out[0].startswith("connect: ok, 127.0.0.1[127.0.0.1]:")
    assert out[2] == "ehlo: ok, the relay offers PIPELINING AUTH=PLAIN,LOGIN SIZE=1000000"
    assert out[-1] == "auth: ok as app"
    assert "MAIL" not in verbs and verbs[-1] == "QUIT", verbs
    assert b"s3cret" not in r.stdout + r.stderr


@pytest.mark.parametrize(
    ("script", "relay", "stage", "code"),
    [
        ({"banner": "554 5.7.1 go away"}, {}, "banner", EX_UNAVAILABLE),
        ({"banner": "421 4.3.2 busy"}, {}, "banner", EX_TEMPFAIL),
        ({"helo": "550 5.7.1 no"}, {}, "helo", EX_UNAVAILABLE),
        ({"ehlo": ehlo("PIPELINING")}, {"tls": "starttls"}, "helo", EX_UNAVAILABLE),  # no STARTTLS offered
        ({"ehlo": ehlo("STARTTLS")}, {"tls": "starttls"}, "starttls", EX_UNAVAILABLE),  # STARTTLS refused
        (
            {"ehlo": AUTH_EHLO, "auth": "535 5.7.8 bad credentials"},
            {"username": "app", "password_file": "pw", "auth_allow_plaintext": True},
            "auth",
            EX_UNAVAILABLE,
        ),
        ({"ehlo": AUTH_EHLO}, {"username": "app", "password_file": "pw"}, "auth", EX_UNAVAILABLE),  # no TLS
        ({"banner": "drop"}, {}, "banner", EX_TEMPFAIL),
    ],
    ids=[
        "banner-5xx",
        "banner-421",
        "helo-5xx",
        "no-starttls",
        "starttls-refused",
        "auth-535",
        "auth-no-tls",
        "drop",
    ],
)
def test_each_failing_step_is_one_line_and_its_exit_code(
    tmp_path: Path, script: dict, relay: dict, stage: str, code: int
) -> None:
    with FaultServer(script) as srv:
        r = run(tmp_path, srv.port, **relay)
    assert r.returncode == code, r
    err = r.stderr.decode()
    assert err.startswith(f"greenmail: relay test: {stage} failed: ") and err.count("\n") == 1, err
    assert "s3cret" not in err


def test_nothing_listening_is_temporary(tmp_path: Path) -> None:
    r = run(tmp_path, support.free_port())
    assert r.returncode == EX_TEMPFAIL
    assert r.stderr.decode().startswith("greenmail: relay test: connect failed: connection refused")
